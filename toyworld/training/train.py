"""Trains the toy world's base model and attribute checker once (weights are committed under
``assets/toyworld/``; the tiny CLIP's loop is ``train_clip.py``, the asset commands are ``assets.py``).

    python -m toyworld train base    --config configs/toyworld/base.yaml     # autoencoder, then UNet + text
    python -m toyworld train checker --config configs/toyworld/checker.yaml  # attribute checker
    python -m toyworld train clip    --config configs/toyworld/clip.yaml     # tiny CLIP
    python -m toyworld export        --config configs/toyworld/base.yaml     # assemble assets/toyworld/

Every command is seeded, with a progress bar on stderr and a JSON-lines log in ``out_dir/log.jsonl``. The long one,
``base`` (about 75 min on one core), is resumable: it checkpoints to ``out_dir/last.pt`` every ``ckpt_every`` steps
and, run again, continues from there (the data stream is a function of the seed and the step, so a resumed run sees
the same batches; the trained autoencoder is kept). ``checker`` and ``clip`` (minutes each) restart from scratch.
"""

from __future__ import annotations

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

from models.io import atomic_write
from models.weights_only import load_weights_only
from toyworld.common.pipeline import clip_tokenizer
from toyworld.named.checker import AttributeChecker
from toyworld.named.measure import attribute_accuracy
from toyworld.named.world import ATTRIBUTES, VALUES, ToyWorldStream


def load_config(path: str | list[str]) -> dict:
    """A toy-world training YAML (``configs/toyworld/``) as a resolved dict; a list of paths is merged in order."""
    paths = [path] if isinstance(path, str) else list(path)
    return OmegaConf.to_container(OmegaConf.merge(*(OmegaConf.load(p) for p in paths)), resolve=True)


def world_stream(cfg: dict, batch_size: int, seed: int, split: str, **caption_args):
    """The training stream of the config's ``world``: ``named`` (``ToyWorldStream`` of ``split``) or ``instance``
    (``toyworld.instance.world.InstanceWorldStream``: category and context captions, the training distribution only)."""
    world = cfg.get("world", "named")
    if world == "named":
        return ToyWorldStream(batch_size, seed=seed, split=split, size=cfg["resolution"], **caption_args)
    if world == "instance":
        from toyworld.instance.stream import InstanceWorldStream

        return InstanceWorldStream(batch_size, seed=seed, size=cfg["resolution"], **caption_args)
    raise ValueError(f"world must be 'named' or 'instance', got {world!r}")


def _save_ckpt(path: Path, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def log_row(out: Path, row: dict) -> None:
    """Appends one JSON line to ``out/log.jsonl``."""
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def optimizer_step(opt, sched, loss: torch.Tensor, bar, out: Path, model: str, step: int) -> None:
    """One optimiser and schedule step, with the loss on the progress bar and in the log every 50 steps."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    sched.step()
    if step % 50 == 0:
        bar.set_postfix(loss=f"{loss.item():.4f}")
        log_row(out, {"model": model, "step": step, "loss": loss.item()})


def lr_lambda(warmup: int, total: int):
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
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, vcfg["steps"]))
    stream = world_stream(cfg, vcfg["batch_size"], cfg["seed"] + 1, "all")
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
            log_row(out, {"model": "vae", "step": step, "rec_mse": rec_loss.item()})
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        x = stream.batch(10_000)["pixels"]
        z = vae.encode(x).latent_dist.mode()
        vae.register_to_config(scaling_factor=float(1.0 / z.std()))
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x).item()
    log_row(out, {"model": "vae", "final_rec_mse": mse, "scaling_factor": vae.config.scaling_factor})
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
    shared = cfg.get("text_encoder_from")
    if shared:  # a trained pipeline's text encoder, frozen: the instance world speaks the named world's words
        folder = Path(shared) / "text_encoder"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"text_encoder_from: no text encoder at {folder}")
        text_encoder = CLIPTextModel.from_pretrained(folder, dtype=torch.float32).requires_grad_(False)
        return unet, text_encoder.eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"]))
    return unet, text_encoder


def train_base(cfg: dict) -> None:
    from diffusers import DDPMScheduler

    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    vae = train_vae(cfg, out)
    unet, text_encoder = build_base(cfg)
    tcfg = cfg["train"]
    frozen_text = bool(cfg.get("text_encoder_from"))
    params = list(unet.parameters()) + ([] if frozen_text else list(text_encoder.parameters()))
    opt = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(tcfg["warmup"], tcfg["steps"]))
    ema_unet, ema_text = (
        copy.deepcopy(unet).requires_grad_(False),
        copy.deepcopy(text_encoder).requires_grad_(False),
    )
    start = 0
    ckpt_path = out / "last.pt"
    if ckpt_path.exists():
        st = load_weights_only(ckpt_path, "base checkpoint")
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
    stream = world_stream(
        cfg,
        tcfg["batch_size"],
        cfg["seed"],
        "base",
        drop_prob=tcfg["drop_prob"],
        empty_prob=tcfg["empty_prob"],
    )
    unet.train()
    text_encoder.train(not frozen_text)
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
        with torch.set_grad_enabled(not frozen_text):
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
            log_row(
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
    out = Path(cfg["out_dir"])
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg["seed"])
    model = AttributeChecker({a: list(VALUES[a]) for a in ATTRIBUTES}, cfg["width"])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(100, cfg["steps"]))
    stream = ToyWorldStream(cfg["batch_size"], seed=cfg["seed"], split="all")
    g = torch.Generator().manual_seed(cfg["seed"])
    t0 = time.time()
    bar = tqdm(range(cfg["steps"]), desc="checker", file=sys.stderr, mininterval=5)
    model.train()
    for step in bar:
        batch = stream.batch(step)
        logits = model(_augment(batch["pixels"], g, cfg["noise"]))
        loss = sum(F.cross_entropy(logits[a], batch["labels"][a]) for a in ATTRIBUTES)
        optimizer_step(opt, sched, loss, bar, out, "checker", step)
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
    log_row(out, {"model": "checker", **report})
    print(json.dumps(report, indent=1))
    model.save_pretrained(out / "checker")
    (out / "checker" / "metrics.json").write_text(json.dumps(report, indent=1))
