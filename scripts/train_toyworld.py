"""Trains the toy world's models once (weights are committed under ``assets/toyworld/``).

    python scripts/train_toyworld.py base    --config configs/toyworld/base.yaml     # autoencoder, then UNet + text
    python scripts/train_toyworld.py checker --config configs/toyworld/checker.yaml  # attribute checker
    python scripts/train_toyworld.py clip    --config configs/toyworld/clip.yaml     # tiny CLIP
    python scripts/train_toyworld.py export  --config configs/toyworld/base.yaml     # assemble assets/toyworld/

Every command is seeded, with a progress bar on stderr and a JSON-lines log in ``out_dir/log.jsonl``. The long one,
``base`` (about 75 min on one core), is resumable: it checkpoints to ``out_dir/last.pt`` every ``ckpt_every`` steps
and, run again, continues from there (the data stream is a function of the seed and the step, so a resumed run sees
the same batches; the trained autoencoder is kept). ``checker`` and ``clip`` (minutes each) restart from scratch.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.toyworld import ToyWorldStream  # noqa: E402
from evaluation.toyworld import attribute_accuracy, clip_pixels, clip_tokenizer, zero_shot_accuracy  # noqa: E402
from models.io import atomic_write  # noqa: E402


def _load_cfg(path: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def _save_ckpt(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def _log(out: Path, row: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))

    return f


# ----------------------------------------------------------------------------------------------- autoencoder
def train_vae(cfg: dict, out: Path):
    """A small AutoencoderKL (32 px -> 4 x 16 x 16); returns it frozen, with its scaling factor set."""
    from diffusers import AutoencoderKL

    vcfg = cfg["vae"]
    path = out / "vae"
    if (path / "config.json").exists():
        return AutoencoderKL.from_pretrained(path).eval().requires_grad_(False)
    torch.manual_seed(cfg["seed"])
    vae = AutoencoderKL(**vcfg["config"])
    opt = torch.optim.AdamW(vae.parameters(), lr=vcfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, vcfg["steps"]))
    stream = ToyWorldStream(vcfg["batch_size"], seed=cfg["seed"] + 1, split="all", size=cfg["resolution"])
    bar = tqdm(range(vcfg["steps"]), desc="vae", file=sys.stderr, mininterval=5)
    for step in bar:
        x = stream.batch(step)["pixels"]
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        rec_loss = F.mse_loss(rec, x)
        loss = rec_loss + vcfg["kl_weight"] * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(rec=f"{rec_loss.item():.5f}")
            _log(out, {"model": "vae", "step": step, "rec_mse": rec_loss.item()})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = stream.batch(10_000)["pixels"]
        z = vae.encode(x).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x).item()
    _log(out, {"model": "vae", "final_rec_mse": mse, "scaling_factor": vae.config.scaling_factor})
    print(
        f"vae: reconstruction MSE {mse:.5f}, scaling factor {vae.config.scaling_factor:.4f}", file=sys.stderr
    )
    vae.save_pretrained(path)
    return vae


# ----------------------------------------------------------------------------------------------- base model
def build_base(cfg: dict):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(cfg["seed"])
    unet = UNet2DConditionModel(**cfg["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    return unet, text_encoder


def train_base(cfg: dict) -> None:
    from diffusers import DDPMScheduler

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    vae = train_vae(cfg, out)
    unet, text_encoder = build_base(cfg)
    tcfg = cfg["train"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(tcfg["warmup"], tcfg["steps"]))
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    start = 0
    ckpt_path = out / "last.pt"
    if ckpt_path.exists():
        st = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        unet.load_state_dict(st["unet"])
        text_encoder.load_state_dict(st["text_encoder"])
        ema_unet.load_state_dict(st["ema_unet"])
        ema_text.load_state_dict(st["ema_text"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        torch.set_rng_state(st["rng"])
        start = st["step"]
        print(f"resumed from {ckpt_path} at step {start}", file=sys.stderr)
    ddim_only = ("timestep_spacing", "set_alpha_to_one")
    noise_sched = DDPMScheduler(**{k: v for k, v in cfg["scheduler"].items() if k not in ddim_only})
    tokenizer = clip_tokenizer()
    stream = ToyWorldStream(
        tcfg["batch_size"],
        seed=cfg["seed"],
        split="base",
        drop_prob=tcfg["drop_prob"],
        empty_prob=tcfg["empty_prob"],
        size=cfg["resolution"],
    )
    unet.train()
    text_encoder.train()
    t0 = time.time()
    bar = tqdm(
        range(start, tcfg["steps"]),
        desc="base",
        file=sys.stderr,
        mininterval=10,
        initial=start,
        total=tcfg["steps"],
    )
    running = None
    for step in bar:
        batch = stream.batch(step)
        ids = tokenizer(
            batch["captions"], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            z0 = vae.encode(batch["pixels"]).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(z0)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (z0.shape[0],))
        zt = noise_sched.add_noise(z0, noise, t)
        target = noise_sched.get_velocity(z0, noise, t)
        ctx = text_encoder(ids)[0]
        pred = unet(zt, t, encoder_hidden_states=ctx).sample
        loss = F.mse_loss(pred.float(), target.float())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"base model loss is {loss.item()} at step {step}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            d = tcfg["ema"] if step > tcfg["warmup"] else 0.0
            for m, e in ((unet, ema_unet), (text_encoder, ema_text)):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - d)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
            _log(
                out,
                {
                    "model": "base",
                    "step": step,
                    "loss": running,
                    "lr": sched.get_last_lr()[0],
                    "elapsed_s": time.time() - t0,
                },
            )
        if (step + 1) % tcfg["ckpt_every"] == 0 or step + 1 == tcfg["steps"]:
            _save_ckpt(
                ckpt_path,
                {
                    "unet": unet.state_dict(),
                    "text_encoder": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "step": step + 1,
                },
            )
    print(f"base: done at step {tcfg['steps']}", file=sys.stderr)


# ----------------------------------------------------------------------------------------------- checker
def _augment(pixels: torch.Tensor, g: torch.Generator, noise: float) -> torch.Tensor:
    """Mild Gaussian pixel noise (std up to ``noise`` in [-1, 1] units) and brightness/contrast jitter."""
    b = pixels.shape[0]
    std = torch.rand(b, 1, 1, 1, generator=g) * noise
    gain = 1 + 0.1 * (torch.rand(b, 1, 1, 1, generator=g) - 0.5)
    bias = 0.1 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)
    return (pixels * gain + bias + std * torch.randn(pixels.shape, generator=g)).clamp(-1, 1)


def train_checker(cfg: dict) -> None:
    from datamodules.toyworld import ATTRIBUTES, VALUES
    from models.checker import AttributeChecker

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    model = AttributeChecker({a: list(VALUES[a]) for a in ATTRIBUTES}, cfg["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(100, cfg["steps"]))
    stream = ToyWorldStream(cfg["batch_size"], seed=cfg["seed"], split="all")
    g = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.time()
    bar = tqdm(range(cfg["steps"]), desc="checker", file=sys.stderr, mininterval=5)
    model.train()
    for step in bar:
        batch = stream.batch(step)
        logits = model(_augment(batch["pixels"], g, cfg["noise"]))
        loss = sum(F.cross_entropy(logits[a], batch["labels"][a]) for a in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            _log(out, {"model": "checker", "step": step, "loss": loss.item()})
    wall = time.time() - t0
    clean = attribute_accuracy(model, seed=cfg["seed"] + 777)
    noisy = attribute_accuracy(model, seed=cfg["seed"] + 778, noise=cfg["eval_noise"])
    report = {
        "steps": cfg["steps"],
        "wall_s": round(wall, 1),
        "accuracy": clean,
        "accuracy_noisy": noisy,
        "eval_noise_std": cfg["eval_noise"],
    }
    _log(out, {"model": "checker", **report})
    print(json.dumps(report, indent=1))
    model.save_pretrained(out / "checker")
    (out / "checker" / "metrics.json").write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------------------------- tiny CLIP
def grouped_batch(n: int, seed: int, step: int, group: int = 8) -> dict:
    """A contrastive batch of hard negatives: groups of ``group`` scenes equal in everything but one attribute
    (shape twice as often as position, size or pattern), with full captions. Colour and background alone then
    cannot tell the captions apart, which pushes the image tower to see shape and position."""
    import numpy as np

    from datamodules.toyworld import VALUES, Scene, caption, random_scene, render, to_tensor

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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(200, cfg["steps"]))
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
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
            _log(out, {"model": "clip", "step": step, "loss": loss.item()})
    wall = time.time() - t0
    acc = zero_shot_accuracy(model, tokenizer)
    report = {"steps": cfg["steps"], "wall_s": round(wall, 1), "zero_shot_accuracy": acc}
    _log(out, {"model": "clip", **report})
    print(json.dumps(report, indent=1))
    model.save_pretrained(out / "clip")
    (out / "clip" / "metrics.json").write_text(json.dumps(report, indent=1))


# ----------------------------------------------------------------------------------------------- export
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toyworld"


def toyworld_vocabulary() -> list[str]:
    """The words the base text encoder was trained on that can name an object (the regulariser's filter)."""
    from datamodules.toyworld import COLOUR_NAMES, PATTERNS, SIZES, TRAIN_SHAPES

    return [*COLOUR_NAMES, *PATTERNS, *TRAIN_SHAPES, *SIZES, "object"]


def export(
    cfg: dict,
    out: Path = ASSETS,
    clip_dir: str = ".cache/toyworld/clip/clip",
    checker_dir: str = ".cache/toyworld/checker/checker",
) -> None:
    """Assembles ``assets/toyworld/``: the pipeline (EMA UNet + text encoder, VAE, tokenizer, DDIM trailing
    v-prediction scheduler, tiny-CLIP vision tower as image encoder), the tiny CLIP, the checker, in fp16."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPImageProcessor, CLIPModel, CLIPVisionModelWithProjection

    from models.checker import AttributeChecker
    from models.io import atomic_write_dir
    from models.tiny import CLIP_MEAN, CLIP_STD

    base = Path(cfg["out_dir"])
    st = torch.load(base / "last.pt", map_location="cpu", weights_only=False)
    unet, text_encoder = build_base(cfg)
    unet.load_state_dict(st["ema_unet"])
    text_encoder.load_state_dict(st["ema_text"])
    vae = AutoencoderKL.from_pretrained(base / "vae")
    clip = CLIPModel.from_pretrained(clip_dir)
    image_encoder = CLIPVisionModelWithProjection(clip.config.vision_config)
    image_encoder.config.projection_dim = clip.config.projection_dim
    image_encoder = CLIPVisionModelWithProjection(image_encoder.config)
    image_encoder.vision_model.load_state_dict(clip.vision_model.state_dict())
    image_encoder.visual_projection.load_state_dict(clip.visual_projection.state_dict())
    size = cfg["resolution"]
    processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=processor,
        image_encoder=image_encoder,
        requires_safety_checker=False,
    ).to(torch.float16)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(out / "pipeline", lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
    atomic_write_dir(
        out / "clip", lambda tmp: clip.to(torch.float16).save_pretrained(tmp, safe_serialization=True)
    )
    checker = AttributeChecker.from_pretrained(checker_dir).half()
    checker.save_pretrained(out / "checker")
    (out / "vocabulary.txt").write_text(
        "# words the toy world's base text encoder was trained on that name an object (vocabulary filter)\n"
        + "\n".join(toyworld_vocabulary())
        + "\n"
    )
    for name in ("checker", "clip"):
        src = Path(checker_dir if name == "checker" else clip_dir) / "metrics.json"
        if src.exists():
            (out / name / "metrics.json").write_text(src.read_text())
    from evaluation.toyworld import image_nn_accuracy

    clip_metrics = (
        json.loads((out / "clip" / "metrics.json").read_text())
        if (out / "clip" / "metrics.json").exists()
        else {}
    )
    clip_metrics["image_nn_accuracy"] = image_nn_accuracy(clip.float())
    clip_metrics["stages"] = [str(clip_dir)]
    (out / "clip" / "metrics.json").write_text(json.dumps(clip_metrics, indent=1) + "\n")
    from evaluation.toyworld import base_adherence

    t0 = time.time()
    acc = base_adherence(n=256, seed=0, pipeline_dir=out / "pipeline", checker_dir=out / "checker")
    adh = {
        "accuracy": acc,
        "n": 256,
        "seed": 0,
        "steps": cfg["sample"]["steps"],
        "guidance": cfg["sample"]["guidance"],
        "wall_s": round(time.time() - t0, 1),
        "command": "python -m evaluation.toyworld base-adherence --n 256 --seed 0",
    }
    (out / "base_adherence.json").write_text(json.dumps(adh, indent=1) + "\n")
    figure(out)
    base_log = [json.loads(x) for x in (base / "log.jsonl").read_text().splitlines()]
    last = [r for r in base_log if r.get("model") == "base"][-1]
    vae_final = [r for r in base_log if "final_rec_mse" in r][-1]
    (out / "train_summary.json").write_text(
        json.dumps(
            {
                "base_steps": st["step"],
                "base_final_loss": last["loss"],
                "base_wall_s_last_run": last["elapsed_s"],
                "vae_rec_mse": vae_final["final_rec_mse"],
                "vae_scaling_factor": vae_final["scaling_factor"],
            },
            indent=1,
        )
        + "\n"
    )
    write_card(out, cfg)
    print(json.dumps(adh), file=sys.stderr)
    print(f"wrote {out}", file=sys.stderr)


def encoder_lines(out: Path) -> list[str]:
    """Model-card lines for the committed encoders: steps and first / final values of their training curves."""
    lines = []
    configs = {
        "date": "configs/pretrain/toyworld.yaml",
        "no_regularizer": "configs/pretrain/toyworld_no_regularizer.yaml",
    }
    for name, config in configs.items():
        path = out / "encoder" / f"{name}.json"
        if not path.exists():
            continue
        info = json.loads(path.read_text())
        curves = info.get("curves", {})
        parts = [
            f"{tag.removeprefix('train/')} {c['first']:.3f} -> {c['mean_last_20']:.3f}"
            for tag, c in sorted(curves.items())
            if tag.startswith("train/loss")
        ]
        lines.append(
            f"- `encoder/{name}.ckpt` (`{config}`, {info.get('global_step')} steps, batch 16, one CPU core ~9 min):"
            f" first logged value -> mean of the last 20 logged values: " + "; ".join(parts) + "."
        )
    return lines


def write_card(out: Path, cfg: dict) -> None:
    """``assets/toyworld/README.md``: the model card, from the measured metrics in the folder."""
    from datamodules.toyworld import ATTRIBUTES, COLOUR_NAMES, HELD_OUT_COMBOS, HELD_OUT_SHAPES, TRAIN_SHAPES

    def load(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    checker, clip = load("checker/metrics.json"), load("clip/metrics.json")
    adh, summary = load("base_adherence.json"), load("train_summary.json")
    sizes = {
        d.name: sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        for d in out.iterdir()
        if d.is_dir()
    }

    def row(name: str, acc: dict) -> str:
        return f"| {name} | " + " | ".join(f"{acc.get(a, float('nan')):.3f}" for a in ATTRIBUTES) + " |"

    head = "| | " + " | ".join(ATTRIBUTES) + " |\n|---|" + "---:|" * len(ATTRIBUTES)
    lines = [
        "# The toy world's models (trained once, committed, fp16 safetensors)",
        "",
        "Generated by `python scripts/train_toyworld.py export --config configs/toyworld/base.yaml`; every number",
        "below was measured by that command (see the JSON files next to this card).",
        "",
        "## Data",
        "32 x 32 procedural scenes (`datamodules/toyworld.py`): one object on a plain background. Shapes "
        + ", ".join(TRAIN_SHAPES)
        + f" (held out of base training: {', '.join(HELD_OUT_SHAPES)}); colours "
        + ", ".join(COLOUR_NAMES)
        + "; patterns plain / striped / checkered; positions left / center / right;"
        " sizes small / large. Held-out shape-colour-pattern combinations: "
        + "; ".join(" ".join((c, p, s)) for s, c, p in HELD_OUT_COMBOS)
        + ".",
        "",
        "## Models",
        f"- `pipeline/`: the base text-to-image model in the diffusers layout (plain `StableDiffusionPipeline`"
        f" loads it): VAE (`AutoencoderKL` 16/32 channels, 32 px -> 4 x 16 x 16, reconstruction MSE"
        f" {summary.get('vae_rec_mse', float('nan')):.4f} in [-1, 1]), CLIP text encoder (2 layers, width 64)"
        f" and `UNet2DConditionModel` (32/64/64) trained jointly for {summary.get('base_steps')} steps, batch"
        f" {cfg['train']['batch_size']}, AdamW {cfg['train']['lr']}, cosine, EMA {cfg['train']['ema']},"
        f" v-prediction; DDIM scheduler with `timestep_spacing: trailing`. Final training loss"
        f" {summary.get('base_final_loss', float('nan')):.4f}; wall time"
        f" {summary.get('base_wall_s_last_run', 0) / 60:.0f} min on one CPU core. `image_encoder/` is the tiny CLIP's vision tower.",
        f"- `clip/`: the tiny CLIP (`CLIPModel`, vision ViT 4 layers patch 4, text 2 layers), contrastive on renders"
        f" of the whole world in four stages (configs/toyworld/clip.yaml, clip_stage2..4.yaml: 1,200 + 800 + 700 +"
        f" {clip.get('steps')} steps; the last two with hard-negative groups that differ in one attribute, because"
        f" the first two learned colours but not shapes). Its image tower still sees shape poorly (row below).",
        f"- `checker/`: the attribute checker (`models.checker.AttributeChecker`), {checker.get('steps')} steps"
        f" ({checker.get('wall_s')} s), on renders of the whole world with noise and brightness jitter.",
        "- `vocabulary.txt`: the words the base text encoder was trained on that name an object (the token",
        "  index's vocabulary filter); `concepts/`: the held-out concepts' input images.",
        f"- Seeds: {cfg['seed']} for every model. Sizes (bytes): "
        + ", ".join(f"{k} {v:,}" for k, v in sorted(sizes.items())),
        "",
        "## Accuracy (per attribute)",
        head,
        row("checker, fresh renders (2,000, new seed)", checker.get("accuracy", {})),
        row(
            f"checker, renders + noise std {checker.get('eval_noise_std')}", checker.get("accuracy_noisy", {})
        ),
        row("tiny CLIP zero-shot (1,000 renders)", clip.get("zero_shot_accuracy", {})),
        row("tiny CLIP image 1-NN (500 vs 500 renders)", clip.get("image_nn_accuracy", {})),
        row(f"base model samples read by the checker ({adh.get('n')} prompts)", adh.get("accuracy", {})),
        "",
        f"Base-model samples: {adh.get('steps')} DDIM steps, guidance {adh.get('guidance')}, prompts from"
        f" `python -m datamodules.toyworld sample-prompts --n {adh.get('n')} --seed {adh.get('seed')}` (every"
        f" attribute stated); reproduce with `{adh.get('command')}`.",
        "",
        "## Encoders (DATE, pretrained on this world)",
        *encoder_lines(out),
        "",
        "## Retrain",
        "```bash",
        "python scripts/train_toyworld.py checker --config configs/toyworld/checker.yaml",
        "python scripts/train_toyworld.py clip    --config configs/toyworld/clip.yaml",
        "python scripts/train_toyworld.py base    --config configs/toyworld/base.yaml   # resumable: rerun to continue",
        "python scripts/train_toyworld.py export  --config configs/toyworld/base.yaml",
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def figure(out: Path = ASSETS, n: int = 8, seed: int = 5) -> Path:
    """``renders_vs_samples.png``: row 1 renders, row 2 base-model samples, for the same ``n`` prompts."""
    import numpy as np

    from datamodules.toyworld import Scene, render, sample_prompts, save_grid
    from evaluation.toyworld import load_pipeline, sample

    rows = sample_prompts(n, seed)
    renders = np.stack([render(Scene(**r["attributes"])) for r in rows])
    images = sample(load_pipeline(out / "pipeline"), [r["prompt"] for r in rows], seed)
    samples = ((images.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    path = out / "renders_vs_samples.png"
    save_grid(np.concatenate([renders, samples]), str(path), cols=n, scale=3)
    (out / "renders_vs_samples.txt").write_text(
        "\n".join(f"{i + 1}. {r['prompt']}" for i, r in enumerate(rows)) + "\n"
    )
    return path


def probe(cfg: dict, n: int = 128, checker_dir: str = ".cache/toyworld/checker/checker") -> None:
    """Adherence of the current base checkpoint (EMA weights), read by the checker: a check during training."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from evaluation.toyworld import adherence, read_attributes, sample
    from models.checker import AttributeChecker

    base = Path(cfg["out_dir"])
    st = torch.load(base / "last.pt", map_location="cpu", weights_only=False)
    unet, text_encoder = build_base(cfg)
    unet.load_state_dict(st["ema_unet"])
    text_encoder.load_state_dict(st["ema_text"])
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(),
        unet=unet,
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    from datamodules.toyworld import sample_prompts

    rows = sample_prompts(n, 0)
    images = sample(pipe, [r["prompt"] for r in rows], 0, cfg["sample"]["steps"], cfg["sample"]["guidance"])
    acc = adherence(
        read_attributes(AttributeChecker.from_pretrained(checker_dir), images),
        [r["attributes"] for r in rows],
    )
    print(json.dumps({"step": st["step"], **{k: round(v, 3) for k, v in acc.items()}}))


def export_encoder(ckpt: str, name: str, log_dir: str | None = None, out: Path = ASSETS) -> Path:
    """Writes ``assets/toyworld/encoder/<name>.ckpt``: a pretraining checkpoint's trainable weights and metadata
    only (no optimizer state, no loops), which ``ConceptTuning(encoder_checkpoint=...)`` reads; and the
    final values of its training curves (from its TensorBoard log) into ``<name>.json``."""
    from lightning_modules.base import CHECKPOINT_KEY

    full = torch.load(ckpt, map_location="cpu", weights_only=False)
    small = {
        "state_dict": full["state_dict"],
        CHECKPOINT_KEY: full[CHECKPOINT_KEY],
        "hyper_parameters": full.get("hyper_parameters", {}),
        "global_step": full.get("global_step"),
    }
    path = out / "encoder" / f"{name}.ckpt"
    atomic_write(path, lambda tmp: torch.save(small, tmp))
    info = {"source": str(ckpt), "global_step": full.get("global_step")}
    if log_dir:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        curves = {}
        for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                values = acc.Scalars(tag)
                if values:
                    last = [v.value for v in values[-20:]]
                    curves[tag] = {
                        "step": values[-1].step,
                        "mean_last_20": sum(last) / len(last),
                        "first": values[0].value,
                    }
        info["curves"] = curves
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=["base", "checker", "clip", "export", "probe", "card", "export-encoder"],
        help="which model to train",
    )
    parser.add_argument(
        "--config", help="YAML config under configs/toyworld/ (all commands but export-encoder)"
    )
    parser.add_argument("--ckpt", help="export-encoder: the pretraining checkpoint (e.g. .../last.ckpt)")
    parser.add_argument("--name", help="export-encoder: date or no_regularizer")
    parser.add_argument("--log-dir", help="export-encoder: its TensorBoard folder (final curve values)")
    args = parser.parse_args(argv)
    if args.command == "export-encoder":
        if not (args.ckpt and args.name):
            parser.error("export-encoder needs --ckpt and --name")
        print(export_encoder(args.ckpt, args.name, args.log_dir))
        return
    if not args.config:
        parser.error(f"{args.command} needs --config")
    cfg = _load_cfg(args.config)
    {
        "base": train_base,
        "checker": train_checker,
        "clip": train_clip,
        "export": export,
        "probe": probe,
        "card": lambda c: write_card(ASSETS, c),
    }[args.command](cfg)


if __name__ == "__main__":
    main()
