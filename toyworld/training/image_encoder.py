"""The toy world's image encoder for DATE's image branch, and the probe gate that says whether it sees concepts.

The tiny CLIP trained with captions alone learned colour but not shape (image 1-NN shape accuracy 0.20; a linear
probe of the [CLS] tokens DATE read: 0.14 on held-out combinations): a contrastive text loss is satisfied by the
colour word of most captions. A real CLIP or DINOv2 sees what makes an object itself, so the toy instrument must
too. This module trains a small ConvNeXt with an image-image objective beside a caption one. Image-image: two
renders of the same object (shape, colour, pattern) in different contexts (background, position, size, jitter)
are positives, every other object in the batch a negative (supervised contrastive loss, SupCon), and batches come
in groups of objects that differ in one identity attribute only (hard negatives). Caption: a linear read-out of
each identity word a full caption states (the simplest text objective; a CLIP's caption loss asks the same of its
image tower). Both heads are dropped after training; DATE reads the tower's stage features.
What did not work (probe table in the model card): continuing the tiny CLIP's ViT with the image-image objective
beside its text loss plateaued at SupCon 1.7 within 700 steps (stopped); the ConvNeXt with SupCon alone reached
shape 0.28 on held-out combinations in 1,500 steps.

    python -m toyworld train image-encoder --config configs/toyworld/image_encoder.yaml
    python -m toyworld probe-image-encoder --encoder assets/toyworld/image_encoder --layers 1 2 3
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from toyworld.common.pipeline import clip_pixels
from toyworld.instance.pairs import instance_pair_batch
from toyworld.instance.world import TRAIN_CATEGORIES
from toyworld.named.world import (
    HELD_OUT_COMBOS,
    SHAPES,
    TRAIN_SHAPES,
    VALUES,
    Scene,
    caption,
    random_scene,
    render,
    seeded_rng,
    to_tensor,
)

IDENTITY = ("shape", "colour", "pattern")


def _context(rng: np.random.Generator, shape: str, colour: str, pattern: str) -> Scene:
    return random_scene(rng, "all", shape=shape, colour=colour, pattern=pattern)


def object_pair_batch(n_objects: int, seed: int, step: int, group: int = 4, split: str = "all") -> dict:
    """``2 * n_objects`` renders: each object twice, in two random contexts. Objects come in groups of
    ``group`` that share two identity attributes and differ in the third (shape half the time).

    Returns ``pixels`` (2N, 3, 32, 32) in [-1, 1], ``object_ids`` (2N,), ``captions`` (2N full captions)."""
    rng = seeded_rng(seed, 0x70616972, step)
    shapes = SHAPES if split == "all" else TRAIN_SHAPES
    objects: list[tuple[str, str, str]] = []
    while len(objects) < n_objects:
        base = [
            str(rng.choice(shapes)),
            str(rng.choice(VALUES["colour"])),
            str(rng.choice(VALUES["pattern"])),
        ]
        axis = int(rng.choice([0, 0, 0, 1, 2]))  # shape, shape, shape, colour, pattern
        pool = shapes if axis == 0 else VALUES[IDENTITY[axis]]
        for v in rng.permutation(pool)[:group]:
            obj = list(base)
            obj[axis] = str(v)
            if split == "base" and tuple(obj) in {(s, c, p) for s, c, p in HELD_OUT_COMBOS}:
                continue
            objects.append((obj[0], obj[1], obj[2]))
    objects = list(
        dict.fromkeys(objects[:n_objects])
    )  # an object occurs once, so its two views are its positives
    scenes, ids = [], []
    for i, (s, c, p) in enumerate(objects):
        for _ in range(2):
            scenes.append(_context(rng, s, c, p))
            ids.append(i)
    images = np.stack([render(sc, 32, rng) for sc in scenes])
    return {
        "pixels": to_tensor(images),
        "object_ids": torch.tensor(ids),
        "labels": {a: torch.tensor([VALUES[a].index(getattr(sc, a)) for sc in scenes]) for a in IDENTITY},
        "captions": [caption(sc, rng, 0.3) for sc in scenes],
    }


def supcon_loss(embeds: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020): each row's positives are the other rows of its id."""
    z = F.normalize(embeds.float(), dim=-1)
    logits = z @ z.T / temperature
    eye = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(eye, float("-inf"))
    pos = (ids[:, None] == ids[None, :]) & ~eye
    log_prob = logits.log_softmax(dim=-1).masked_fill(~pos, 0.0)
    return -(log_prob.sum(-1) / pos.sum(-1).clamp_min(1)).mean()


def tower_pixels(pixels: torch.Tensor, size: int) -> torch.Tensor:
    """[-1, 1] renders -> the tower's input: resized to ``size`` (bilinear, as the image processor does) and
    CLIP-normalised."""
    if pixels.shape[-1] != size:
        pixels = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False)
    return clip_pixels(pixels)


def _save_processor(dest: Path, size: int = 32) -> None:
    from transformers import CLIPImageProcessor

    from models.tiny import CLIP_MEAN, CLIP_STD

    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(dest)


def _schedule(opt, total: int, warm: int = 100):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / total)))
    )


def _head_input(model, pixel_values: torch.Tensor, head_features: str) -> torch.Tensor:
    """The features the training heads read: the pooled last stage, or the mean-pooled stages concatenated."""
    from models.encoder import image_tokens

    if head_features == "last":
        return model(pixel_values=pixel_values).pooler_output.flatten(1)
    states = model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
    return torch.cat([image_tokens(h, "mean") for h in states[1:]], dim=-1)


def train(cfg: dict) -> Path:
    """A small ConvNeXt (``transformers.ConvNextModel``) trained from scratch with the image-image objective
    alone (SupCon on a linear projection of its pooled output, dropped after training): the toy world's
    counterpart of a self-supervised image tower such as DINOv2. Saved with ``save_pretrained`` (+ processor
    config) to ``out_dir/image_encoder``; the project loads it through ``AutoModel``. ``world: instance`` trains
    on the instance world instead (``toyworld.instance.pairs``; the caption side reads out the category).
    ``head_features: stages`` puts both heads on the mean-pooled stages concatenated (what DATE reads) instead
    of the pooled last stage."""
    from transformers import AutoModel, ConvNextConfig, ConvNextModel, ResNetConfig, ResNetModel

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    size = int(cfg.get("image_size", 32))
    if cfg.get("arch", "convnext") == "resnet":
        model = ResNetModel(ResNetConfig(image_size=size, **cfg["resnet"]))
    else:
        model = ConvNextModel(ConvNextConfig(image_size=size, **cfg["convnext"]))
    if cfg.get("init_from"):  # a second stage continues the first one (tower and heads)
        model = AutoModel.from_pretrained(cfg["init_from"], dtype=torch.float32)
    # Which features the heads read: ``last``, the pooled last stage (the default, what the first encoders were
    # trained with), or ``stages``, every stage mean-pooled and concatenated: what DATE's image branch reads
    # (``image_features: mean``, ``clip_layer_stride: 1``; ``toyworld.diagnostics.instance_probe``), so the losses shape
    # the very features DATE and the gate read.
    head_features = cfg.get("head_features", "last")
    if head_features not in ("last", "stages"):
        raise ValueError(f"head_features must be last or stages, got {head_features!r}")
    width = sum(model.config.hidden_sizes) if head_features == "stages" else model.config.hidden_sizes[-1]
    head = torch.nn.Linear(width, cfg["projection_dim"])
    # The caption side: one linear read-out per identity word a full caption states (shape, colour, pattern),
    # the simplest text objective (what a CLIP's caption loss asks of the image tower); dropped after training.
    # The instance world's captions state one identity word, the category (toyworld/instance/pairs.py).
    world = cfg.get("world", "named")
    if world not in ("named", "instance"):
        raise ValueError(f"world must be named or instance, got {world!r}")
    vocab = {a: len(VALUES[a]) for a in IDENTITY}
    if world == "instance":
        vocab = {"category": len(TRAIN_CATEGORIES)}
    words = torch.nn.ModuleDict({a: torch.nn.Linear(width, n) for a, n in vocab.items()})
    if cfg.get("init_from") and (Path(cfg["init_from"]).parent / "heads.pt").is_file():
        heads = torch.load(Path(cfg["init_from"]).parent / "heads.pt", weights_only=True)
        head.load_state_dict(heads["projection"])
        words.load_state_dict(heads["words"])
    params = [*model.parameters(), *head.parameters(), *words.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.05)
    total = cfg["steps"]
    sched = _schedule(opt, total)
    bar = tqdm(range(total), desc="image encoder", file=sys.stderr, mininterval=10)
    t0 = time.time()
    model.train()
    with open(out / "log.jsonl", "a") as log:
        for step in bar:
            if world == "instance":
                batch = instance_pair_batch(
                    cfg["n_objects"], cfg["seed"], step, cfg["group"], cfg.get("one_detail", 0.5)
                )
            else:
                batch = object_pair_batch(cfg["n_objects"], cfg["seed"], step, cfg["group"], cfg["split"])
            pooled = _head_input(model, tower_pixels(batch["pixels"], size), head_features)
            image_loss = supcon_loss(head(pooled), batch["object_ids"], cfg["temperature"])
            word_loss = sum(F.cross_entropy(words[a](pooled), batch["labels"][a]) for a in vocab) / len(vocab)
            loss = cfg["image_weight"] * image_loss + cfg["word_weight"] * word_loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 50 == 0:
                row = {"step": step, "image_loss": image_loss.item(), "word_loss": word_loss.item()}
                bar.set_postfix(img=f"{row['image_loss']:.3f}", words=f"{row['word_loss']:.3f}")
                log.write(json.dumps(row) + "\n")
                log.flush()
    dest = out / "image_encoder"
    model.eval().save_pretrained(dest)
    _save_processor(dest, size)
    torch.save({"projection": head.state_dict(), "words": words.state_dict()}, out / "heads.pt")
    (dest / "train.json").write_text(json.dumps({"wall_s": round(time.time() - t0, 1), **cfg}, indent=1))
    return dest
