"""The toy world's assets: assembling ``assets/toyworld/`` from the trained models, its model card and figure, the
committed encoders, and a probe of a base checkpoint during training (``python -m toyworld export | card | probe |
export-encoder``)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from evaluation.generate.images import save_grid
from models.io import atomic_write, atomic_write_dir
from models.tiny import CLIP_MEAN, CLIP_STD
from models.weights_only import load_weights_only
from toyworld.common.pipeline import ASSETS, clip_tokenizer, load_pipeline, sample
from toyworld.named.checker import AttributeChecker, adherence, read_attributes
from toyworld.named.measure import base_adherence, image_nn_accuracy
from toyworld.named.world import (
    ATTRIBUTES,
    COLOUR_NAMES,
    HELD_OUT_COMBOS,
    HELD_OUT_SHAPES,
    PATTERNS,
    SIZES,
    TRAIN_SHAPES,
    Scene,
    render,
    sample_prompts,
)
from toyworld.release.card import encoder_lines, instance_lines
from toyworld.training.train import build_base


def toyworld_vocabulary() -> list[str]:
    """The words the base text encoder was trained on that can name an object (the regulariser's filter)."""
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

    base = Path(cfg["out_dir"])
    st = load_weights_only(base / "last.pt", "base checkpoint")
    unet, text_encoder = build_base(cfg)
    unet.load_state_dict(st["ema_unet"])
    text_encoder.load_state_dict(st["ema_text"])
    vae = AutoencoderKL.from_pretrained(base / "vae")
    clip = CLIPModel.from_pretrained(clip_dir)
    vision_config = clip.config.vision_config
    vision_config.projection_dim = clip.config.projection_dim  # the tower's projection = the CLIP's
    image_encoder = CLIPVisionModelWithProjection(vision_config)
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
    clip_metrics = (
        json.loads((out / "clip" / "metrics.json").read_text())
        if (out / "clip" / "metrics.json").exists()
        else {}
    )
    clip_metrics["image_nn_accuracy"] = image_nn_accuracy(clip.float())
    clip_metrics["stages"] = [str(clip_dir)]
    (out / "clip" / "metrics.json").write_text(json.dumps(clip_metrics, indent=1) + "\n")
    t0 = time.time()
    acc = base_adherence(n=256, seed=0, pipeline_dir=out / "pipeline", checker_dir=out / "checker")
    adh = {
        "accuracy": acc,
        "n": 256,
        "seed": 0,
        "steps": cfg["sample"]["steps"],
        "guidance": cfg["sample"]["guidance"],
        "wall_s": round(time.time() - t0, 1),
        "command": "python -m toyworld base-adherence --n 256 --seed 0",
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


def image_encoder_lines(out: Path) -> list[str]:
    """Model-card lines for the image branch's encoder: what it is and its probe gate (measured results)."""
    probe_path, train_path = out / "image_encoder" / "probe.json", out / "image_encoder" / "train.json"
    if not probe_path.exists():
        return []
    probe, train = json.loads(probe_path.read_text()), json.loads(train_path.read_text())
    acc = ", ".join(f"{k} {v:.2f}" for k, v in probe.items() if "/" in k)
    return [
        f"- `image_encoder/`: the image branch of the encoders, a {train.get('arch')} (`transformers`, loaded"
        f" through `AutoModel`) read at {train.get('image_size')} px, trained {train.get('steps')} steps"
        f" ({train.get('wall_s')} s on one core) with an image-image objective (two renders of one object in"
        " other contexts are positives) beside a read-out of the identity words captions state"
        " (`configs/toyworld/image_encoder.yaml`). The tiny CLIP's ViT, which the first encoders read, saw"
        " colour but not shape. Gate before encoder pretraining (`python -m toyworld probe-image-encoder`):"
        f" a linear probe of the mean-pooled stages DATE reads, trained on base renders: {acc}.",
    ]


def write_card(out: Path, cfg: dict) -> None:
    """``assets/toyworld/README.md``: the model card, from the measured metrics in the folder."""

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
        "Generated by `python -m toyworld export --config configs/toyworld/base.yaml`; every number",
        "below was measured by that command (see the JSON files next to this card).",
        "",
        "## Data",
        "32 x 32 procedural scenes (`toyworld/named/world.py`): one object on a plain background. Shapes "
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
        f" {summary.get('base_wall_s_last_run', 0) / 60:.0f} min on one CPU core."
        " `image_encoder/` is the tiny CLIP's vision tower.",
        f"- `clip/`: the tiny CLIP (`CLIPModel`, vision ViT 4 layers patch 4, text 2 layers), contrastive on renders"
        f" of the whole world in four stages (configs/toyworld/clip.yaml, clip_stage2..4.yaml: 1,200 + 800 + 700 +"
        f" {clip.get('steps')} steps; the last two with hard-negative groups that differ in one attribute, because"
        f" the first two learned colours but not shapes). Its image tower still sees shape poorly (row below).",
        f"- `checker/`: the attribute checker (`toyworld.named.checker.AttributeChecker`), {checker.get('steps')} steps"
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
        f" `python -m toyworld sample-prompts --n {adh.get('n')} --seed {adh.get('seed')}` (every"
        f" attribute stated); reproduce with `{adh.get('command')}`.",
        "",
        "## Encoders (DATE, pretrained on this world)",
        *image_encoder_lines(out),
        *encoder_lines(out),
        "",
        *instance_lines(out),
        "",
        "## Retrain",
        "```bash",
        "python -m toyworld train checker --config configs/toyworld/checker.yaml",
        "python -m toyworld train clip    --config configs/toyworld/clip.yaml",
        "python -m toyworld train base    --config configs/toyworld/base.yaml   # resumable: rerun to continue",
        "python -m toyworld export        --config configs/toyworld/base.yaml",
        "python -m toyworld train image-encoder --config configs/toyworld/image_encoder.yaml",
        "python -m toyworld probe-image-encoder --encoder .cache/toyworld/image_encoder/image_encoder",
        "```",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def figure(out: Path = ASSETS, n: int = 8, seed: int = 5) -> Path:
    """``renders_vs_samples.png``: row 1 renders, row 2 base-model samples, for the same ``n`` prompts."""
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

    base = Path(cfg["out_dir"])
    st = load_weights_only(base / "last.pt", "base checkpoint")
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
    rows = sample_prompts(n, 0)
    images = sample(pipe, [r["prompt"] for r in rows], 0, cfg["sample"]["steps"], cfg["sample"]["guidance"])
    acc = adherence(
        read_attributes(AttributeChecker.from_pretrained(checker_dir), images),
        [r["attributes"] for r in rows],
    )
    print(json.dumps({"step": st["step"], **{k: round(v, 3) for k, v in acc.items()}}))


def export_encoder(
    ckpt: str,
    name: str,
    log_dir: str | None = None,
    out: Path = ASSETS,
    folder: str = "encoder",
    fp16: bool = False,
) -> Path:
    """Writes ``assets/toyworld/<folder>/<name>.ckpt`` (``folder``: ``encoder``, or ``instance_encoder`` for
    the instance world's; ``fp16``: the weights stored in float16, as the instance world's are to keep the
    assets small): a pretraining checkpoint's trainable weights and metadata only (no optimizer state, no
    loops), which ``ConceptTuning(encoder_checkpoint=...)`` reads; and the final values of its training curves
    (from its TensorBoard log) into ``<name>.json``."""
    from lightning_modules.checkpoint import CHECKPOINT_KEY

    full = load_weights_only(ckpt, "checkpoint")
    state = full["state_dict"]
    if fp16:  # half the bytes; ConceptTuning loads them into its float32 personalizer (load_state_dict casts)
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    small = {
        "state_dict": state,
        CHECKPOINT_KEY: full[CHECKPOINT_KEY],
        "hyper_parameters": full.get("hyper_parameters", {}),
        "global_step": full.get("global_step"),
    }
    path = out / folder / f"{name}.ckpt"
    atomic_write(path, lambda tmp: torch.save(small, tmp))
    info = {"source": str(ckpt), "global_step": full.get("global_step")}
    if log_dir:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        # A resumed run writes a new event file (or folder) per resume: a curve is every file's values by step,
        # a later file's value replacing an earlier one's at the same step, not the last file's part alone.
        by_tag: dict[str, dict[int, float]] = {}
        for events in sorted(Path(log_dir).rglob("events.out.tfevents.*")):
            acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
            acc.Reload()
            for tag in acc.Tags().get("scalars", []):
                by_tag.setdefault(tag, {}).update({v.step: v.value for v in acc.Scalars(tag)})
        curves = {}
        for tag, points in by_tag.items():
            # the run may have gone on past the exported step: its curve ends at that step
            steps = [k for k in sorted(points) if k <= (full.get("global_step") or k)]
            if steps:
                last = [points[k] for k in steps[-20:]]
                curves[tag] = {
                    "step": steps[-1],
                    "mean_last_20": sum(last) / len(last),
                    "first": points[steps[0]],
                }
        info["curves"] = curves
        # identity on the validation concepts (toyworld.named.validation.ValidationIdentity, one validation.jsonl
        # per log folder): the whole run, resumes included, by step
        rows: dict[int, dict] = {}
        for val in sorted(Path(log_dir).rglob("validation.jsonl")):
            for line in val.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    rows[row["step"]] = row
        if rows:
            info["validation"] = [rows[k] for k in sorted(rows) if k <= (full.get("global_step") or k)]
    path.with_suffix(".json").write_text(json.dumps(info, indent=1) + "\n")
    return path
