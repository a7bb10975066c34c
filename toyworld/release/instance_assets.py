"""The instance world's base model as an asset: export it next to the named world's pipeline, and
measure it from pixels.

The instance base model (``configs/toyworld/instance_base.yaml``) trains its UNet and autoencoder on
``InstanceWorldStream`` with the named world's text encoder frozen (the captions use the same words and template),
so the exported ``assets/toyworld/instance_pipeline/`` stores only what it trained (UNet, VAE, scheduler) and
links the rest (``SHARED``: text encoder, tokenizer, image encoder, feature extractor) to the named pipeline's
folders with relative symlinks. Plain ``StableDiffusionPipeline.from_pretrained("assets/toyworld/instance_pipeline")``
follows them; ``assets/`` stays within its 30 MB.

Measured from pixels (``toyworld/instance/pixels.py``, no trained model), :func:`instance_adherence`:

- **prompt**: for ``n`` random training-distribution instances in random contexts, the caption (category and
  context) is sampled and background, position and size are read back (each, and all three together);
- **same words, different instances**: the pixel identity score between two samples of the same caption with
  different seeds, against the same score between two renders of one instance in the two contexts read back
  (what the score gives when the instance is the same). A base model that drew one fixed instance per category
  would score near the second; the world needs it near what two random same-category instances score.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from models.io import atomic_write_dir
from models.weights_only import load_weights_only
from toyworld.common.pipeline import ASSETS, GUIDANCE, SAMPLE_STEPS, load_pipeline, sample
from toyworld.instance import pixels
from toyworld.instance.render import render
from toyworld.instance.world import CONTEXT, Context, caption, random_context, sample_instance
from toyworld.named.world import seeded_rng, to_tensor

PIPELINE_NAME = "instance_pipeline"
SHARED = ("text_encoder", "tokenizer", "image_encoder", "feature_extractor")


def export_instance(cfg: dict, out: Path = ASSETS, name: str = PIPELINE_NAME) -> Path:
    """Writes ``out/name``: the EMA UNet and the VAE of the instance base checkpoint (``cfg["out_dir"]``), the
    DDIM trailing scheduler, and relative symlinks for the :data:`SHARED` components of
    ``cfg["text_encoder_from"]`` (the frozen text encoder's pipeline), in fp16. Returns the folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline

    from toyworld.training.train import build_base

    shared_from = cfg.get("text_encoder_from")
    if not shared_from:
        raise ValueError(
            "export-instance needs a config with text_encoder_from (the frozen text encoder's pipeline)"
        )
    base, shared_from = Path(cfg["out_dir"]), Path(shared_from)
    st = load_weights_only(base / "last.pt", "base checkpoint")
    unet, _ = build_base(cfg)
    unet.load_state_dict(st["ema_unet"])
    named = StableDiffusionPipeline.from_pretrained(shared_from, dtype=torch.float16)
    frozen = st["text_encoder"]  # the checkpoint's copy: must be the shared encoder, unchanged
    for key, value in named.text_encoder.state_dict().items():
        if key in frozen and not torch.equal(frozen[key].half(), value):
            raise ValueError(f"{base / 'last.pt'}: text encoder {key} differs from {shared_from}'s")
    pipe = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(base / "vae"),
        text_encoder=named.text_encoder,
        tokenizer=named.tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**cfg["scheduler"]),
        safety_checker=None,
        feature_extractor=named.feature_extractor,
        image_encoder=named.image_encoder,
        requires_safety_checker=False,
    ).to(torch.float16)
    dest = out / name

    def write(tmp: str) -> None:
        pipe.save_pretrained(tmp, safe_serialization=True)
        for comp in SHARED:
            shutil.rmtree(Path(tmp) / comp)
            os.symlink(os.path.relpath((shared_from / comp).resolve(), dest.resolve()), Path(tmp) / comp)

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_dir(dest, write)
    log = [json.loads(x) for x in (base / "log.jsonl").read_text().splitlines()]
    last = [r for r in log if r.get("model") == "base"][-1]
    vae = [r for r in log if "final_rec_mse" in r][-1]
    summary = {
        "base_steps": st["step"],
        "base_final_loss": last["loss"],
        "base_wall_s_last_run": last["elapsed_s"],
        "vae_rec_mse": vae["final_rec_mse"],
        "vae_scaling_factor": vae["scaling_factor"],
        "text_encoder_from": str(shared_from),
    }
    (dest / "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {dest}", file=sys.stderr)
    return dest


def _contexts_read(images: torch.Tensor, wanted: list[Context]) -> dict[str, list[float]]:
    hits: dict[str, list[float]] = {a: [] for a in (*CONTEXT, "all")}
    for image, want in zip(images, wanted):
        read = pixels.read_context(image)
        ok = {a: float(read[a] == getattr(want, a)) for a in CONTEXT}
        for a in CONTEXT:
            hits[a].append(ok[a])
        hits["all"].append(float(all(ok.values())))
    return hits


def instance_adherence(
    n: int = 128,
    seed: int = 0,
    pipeline_dir: str | Path = ASSETS / PIPELINE_NAME,
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
    grid: str | Path | None = None,
) -> dict:
    """Prompt accuracy from pixels and same-caption diversity of the instance base model (module docstring);
    ``grid``: also a PNG whose rows are the first 8 captions: a render of the instance it was drawn from, then the
    two samples (the same words, two seeds)."""
    t0 = time.time()
    pipe = load_pipeline(pipeline_dir)
    rng = seeded_rng(seed, 0x61646865)
    instances = [sample_instance(rng, "train") for _ in range(n)]
    contexts = [random_context(rng, inst) for inst in instances]
    prompts = [caption(inst.category, ctx) for inst, ctx in zip(instances, contexts)]
    first = (sample(pipe, prompts, seed, steps, guidance) + 1) / 2  # [0, 1], as the pixel metric reads
    second = (sample(pipe, prompts, seed + 1, steps, guidance) + 1) / 2
    hits = _contexts_read(torch.cat([first, second]), contexts + contexts)
    same_words = [pixels.identity(a, b)["identity"] for a, b in zip(first, second)]
    same_instance, other_instance = [], []
    for i, (inst, ctx) in enumerate(zip(instances, contexts)):
        again = random_context(rng, inst)
        same_instance.append(pixels.identity(render(inst, ctx), render(inst, again))["identity"])
        other = instances[(i + 1) % n]
        pair = [j for j in range(n) if instances[j].category == inst.category and j != i]
        other = instances[pair[0]] if pair else other
        other_instance.append(pixels.identity(render(inst, ctx), render(other, again))["identity"])
    if grid is not None:
        from evaluation.generate.images import save_grid

        rows = []
        for i in range(min(8, n)):
            rows += [render(instances[i], contexts[i]), *(pixels.as_uint8(x[i]) for x in (first, second))]
        save_grid(np.stack(rows), str(grid), cols=3, scale=3)
    mean = lambda xs: round(float(np.mean(xs)), 3)  # noqa: E731
    return {
        "prompt_accuracy": {a: mean(v) for a, v in hits.items()},
        "same_caption_two_seeds_identity": mean(same_words),
        "same_caption_two_seeds_identity_acc": mean([s >= pixels.IDENTITY_THRESHOLD for s in same_words]),
        "renders_same_instance_identity": mean(same_instance),
        "renders_same_category_identity": mean(other_instance),
        "n": n,
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "wall_s": round(time.time() - t0, 1),
        "pipeline": str(pipeline_dir),
    }


@torch.no_grad()
def autoencoder_ceiling(concepts_dir: str | Path, pipeline_dir: str | Path = ASSETS / PIPELINE_NAME) -> dict:
    """The identity a method could reach if it found each input image's own latent: every concept's input image
    encoded (latent mean) and decoded by the pipeline's autoencoder, scored against the input from pixels."""
    from diffusers import AutoencoderKL
    from PIL import Image

    from toyworld.named.concepts import read_concept_index

    vae = AutoencoderKL.from_pretrained(Path(pipeline_dir) / "vae", dtype=torch.float32)
    index = read_concept_index(Path(concepts_dir), None, 1, "instance-concepts")
    parts: dict[str, list[float]] = {"identity": [], "accuracy": [], "iou": [], "colour": [], "pattern": []}
    for _, entry in index:
        image = np.array(Image.open(Path(concepts_dir) / entry["image"]).convert("RGB"))
        x = to_tensor(image[None])
        back = (vae.decode(vae.encode(x).latent_dist.mean).sample[0].clamp(-1, 1) + 1) / 2
        sim = pixels.identity(back, image)
        sim["accuracy"] = float(sim["identity"] >= pixels.IDENTITY_THRESHOLD)
        for key, values in parts.items():
            values.append(sim[key])
    return {k: round(float(np.mean(v)), 3) for k, v in parts.items()} | {"n": len(index)}
