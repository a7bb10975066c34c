"""A supervised oracle for the instance-probe gate: a DIAGNOSTIC, never a solution.

The question it answers: are the instance details readable at all at 32 px by the image encoder's architecture,
i.e. is the gate (``toyworld/diagnostics/instance_probe.py``) attainable? The oracle is the same small ResNet as
``configs/toyworld/instance_image_encoder.yaml`` (same input size, same ``tower_pixels`` path), trained from
scratch and TOLD every detail: one linear head per detail on the mean-pooled stages DATE and the gate read,
regressing the gate's own targets (``instance_probe.target``; circular ones as cos / sin; MSE on targets
standardised over a reference batch) and classifying its categorical ones (cross-entropy), on
training-distribution instances in random contexts (``instance_pairs.instance_pair_batch``, independent
instances, two contexts each). What it reaches is an upper bound for this architecture at this resolution, not an
encoder for DATE: it is trained on the very read-outs the gate scores, which a self-supervised tower never sees.
Its weights are not committed.

    python -m toyworld instance-oracle --steps 2000 --out-dir .cache/toyworld/instance_oracle
    python -m toyworld instance-probe --encoder .cache/toyworld/instance_oracle/image_encoder --cells validation

``--image-size 128`` trains it on the renders upsampled 4x instead of 2x (the stem's 4x downsampling then hands
stage 1 the render's own 32 x 32 resolution; rows in docs/research/instance_image_encoder.md); the gate reads the
folder at that size.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from toyworld.diagnostics.instance_probe import CATEGORICAL, CONTINUOUS, target
from toyworld.instance.pairs import instance_pair_batch
from toyworld.training.image_encoder import _head_input, _save_processor, _schedule, supcon_loss, tower_pixels

RESNET = {"embedding_size": 32, "hidden_sizes": [32, 64, 128], "depths": [1, 1, 1], "layer_type": "basic"}
N_CLASSES = {"pattern": 4, "points": 4, "category": 6}


def _targets(insts, detail: str):
    """(row indices where ``detail`` is defined, their targets: float (n, d) or class indices (n,))."""
    rows = [(i, t) for i, inst in enumerate(insts) if (t := target(inst, detail)) is not None]
    if not rows:  # e.g. no striped instance in a grouped batch: the detail is skipped this step
        return torch.zeros(0, dtype=torch.long), None
    idx = torch.tensor([i for i, _ in rows], dtype=torch.long)
    if detail in CATEGORICAL:
        return idx, torch.tensor([t for _, t in rows], dtype=torch.long)
    return idx, torch.tensor([t for _, t in rows], dtype=torch.float32).reshape(len(rows), -1)


def train_oracle(
    out_dir: str,
    steps: int = 2000,
    n_instances: int = 48,
    lr: float = 3e-3,
    seed: int = 0,
    image_size: int = 64,
    resnet: dict | None = None,
    contrastive_weight: float = 0.0,
    group: int = 1,
    one_detail: float = 0.0,
    temperature: float = 0.1,
) -> Path:
    """Trains the oracle (``2 * n_instances`` renders a step); saves the tower as an image-encoder folder
    ``out_dir/image_encoder`` (readable by ``instance-probe --encoder``) with ``train.json`` (wall seconds, final
    losses). Heads are dropped.

    ``contrastive_weight`` > 0 adds SupCon (``image_encoder.supcon_loss``, ``temperature``) on a 64-d projection
    of the same pooled stages: the two renders of an instance are positives, every other render a negative, with
    ``group`` instances of one category per group and a fraction ``one_detail`` of the groups differing in one
    detail each (``instance_pairs.instance_pair_batch``): the hybrid the instance encoder is trained as."""
    from transformers import ResNetConfig, ResNetModel

    torch.manual_seed(seed)
    model = ResNetModel(ResNetConfig(image_size=image_size, **(resnet or RESNET)))
    width = sum(model.config.hidden_sizes)
    ref = instance_pair_batch(256, seed + 1, 0, group=1, one_detail=0.0)["instances"]  # target scales
    scale = {}
    for d in CONTINUOUS:
        y = _targets(ref, d)[1]
        scale[d] = (y.mean(0), y.std(0).clamp_min(1e-3))
    heads = torch.nn.ModuleDict(
        {d: torch.nn.Linear(width, len(scale[d][0])) for d in CONTINUOUS}
        | {d: torch.nn.Linear(width, n) for d, n in N_CLASSES.items()}
        | {"projection": torch.nn.Linear(width, 64)}
    )
    opt = torch.optim.AdamW([*model.parameters(), *heads.parameters()], lr=lr, weight_decay=0.05)
    sched = _schedule(opt, steps)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0, losses = time.time(), {}
    model.train()
    for step in range(steps):
        batch = instance_pair_batch(n_instances, seed, step, group=group, one_detail=one_detail)
        feats = _head_input(model, tower_pixels(batch["pixels"], image_size), "stages")
        loss = torch.zeros(())
        if contrastive_weight > 0:
            part = supcon_loss(heads["projection"](feats), batch["object_ids"], temperature)
            losses["supcon"] = round(part.item(), 4)
            loss = loss + contrastive_weight * part
        for d in (*CONTINUOUS, *CATEGORICAL):
            idx, y = _targets(batch["instances"], d)
            if len(idx) == 0:
                continue
            pred = heads[d](feats[idx])
            if d in CATEGORICAL:
                part = F.cross_entropy(pred, y)
            else:
                part = F.mse_loss(pred, (y - scale[d][0]) / scale[d][1])
            losses[d] = round(part.item(), 4)
            loss = loss + part
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.3f} {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    dest = out / "image_encoder"
    model.eval().save_pretrained(dest)
    _save_processor(dest, image_size)
    info = {"wall_s": round(time.time() - t0, 1), "steps": steps, "n_instances": n_instances, "lr": lr}
    info |= {"seed": seed, "image_size": image_size, "contrastive_weight": contrastive_weight, "group": group}
    info |= {"one_detail": one_detail, "temperature": temperature, "final_losses": losses}
    (dest / "train.json").write_text(json.dumps(info, indent=1))
    return dest
