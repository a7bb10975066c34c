"""The tiny CLIP of the toy world: a contrastive loop on renders (with hard-negative groups in later stages).

    python -m toyworld train clip --config configs/toyworld/clip.yaml     # then clip_stage2..4.yaml

Kept apart from the base model and checker loops (``train.py``) so that new objectives land in one place.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from toyworld.common.pipeline import clip_pixels, clip_tokenizer
from toyworld.named.measure import zero_shot_accuracy
from toyworld.named.world import ToyWorldStream
from toyworld.training.train import log_row, lr_lambda, optimizer_step


def grouped_batch(n: int, seed: int, step: int, group: int = 8) -> dict:
    """A contrastive batch of hard negatives: groups of ``group`` scenes equal in everything but one attribute
    (shape twice as often as position, size or pattern), with full captions. Colour and background alone then
    cannot tell the captions apart, which pushes the image tower to see shape and position."""
    import numpy as np

    from toyworld.named.world import VALUES, Scene, caption, random_scene, render, to_tensor

    rng = np.random.default_rng([seed, 0x67727570, step])
    scenes = []
    while len(scenes) < n:
        base = random_scene(rng, "all")
        attr = ("shape", "shape", "position", "size", "pattern")[int(rng.integers(5))]
        values = list(rng.permutation(VALUES[attr]))
        for v in (values * group)[:group]:
            scenes.append(Scene(**{**base.__dict__, attr: str(v)}))
    scenes = scenes[:n]
    images = np.stack([render(s, 32, rng) for s in scenes])
    return {"pixels": to_tensor(images), "captions": [caption(s) for s in scenes]}


def train_clip(cfg: dict) -> None:
    from transformers import CLIPConfig, CLIPModel

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    config = CLIPConfig(
        text_config=cfg["text"], vision_config=cfg["vision"], projection_dim=cfg["projection_dim"]
    )
    model = CLIPModel(config)
    if cfg.get("init_from"):  # a second stage continues from the first one's weights
        model = CLIPModel.from_pretrained(cfg["init_from"], dtype=torch.float32)
    tokenizer = clip_tokenizer()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(200, cfg["steps"]))
    stream = ToyWorldStream(
        cfg["batch_size"], seed=cfg["seed"], split="all", drop_prob=cfg["drop_prob"], empty_prob=0.0
    )
    t0 = time.time()
    bar = tqdm(range(cfg["steps"]), desc="clip", file=sys.stderr, mininterval=5)
    model.train()
    grouped = cfg.get("grouped_prob", 0.0)
    for step in bar:
        batch = stream.batch(step)
        if grouped and torch.rand(1).item() < grouped:
            batch = grouped_batch(cfg["batch_size"], cfg["seed"], step)
        ids = tokenizer(
            batch["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        # the same caption can occur twice in a batch: rows with identical captions are not negatives
        same = torch.tensor([[a == b for b in batch["captions"]] for a in batch["captions"]])
        outputs = model(input_ids=ids, pixel_values=clip_pixels(batch["pixels"]))
        logits = outputs.logits_per_image.float()
        logits = logits.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool), float("-inf"))
        labels = torch.arange(len(logits))
        loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
        optimizer_step(opt, sched, loss, bar, out, "clip", step)
    wall = time.time() - t0
    acc = zero_shot_accuracy(model, tokenizer)
    report = {"steps": cfg["steps"], "wall_s": round(wall, 1), "zero_shot_accuracy": acc}
    log_row(out, {"model": "clip", **report})
    print(json.dumps(report, indent=1))
    model.save_pretrained(out / "clip")
    (out / "clip" / "metrics.json").write_text(json.dumps(report, indent=1))
