"""The research instruments' commands (``python -m toyworld <command> --help``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from toyworld.cli import UsageError, check


def probe_image_encoder(
    encoder: str = "assets/toyworld/image_encoder", features: str = "mean", layers: list[int] | None = None
) -> None:
    """Linear probe of the features DATE's image branch reads (the gate).

    Args:
        encoder: image-encoder folder
        features: cls | mean | cls_mean (models.encoder.image_tokens)
        layers: hidden-state indices (default: every 2nd layer)
    """
    check(
        (Path(encoder) / "config.json").is_file(),
        f"--encoder {encoder} is not an image-encoder folder (no config.json)",
    )
    from toyworld.diagnostics.image_probe import probe

    print(json.dumps(probe(encoder, features, layers), indent=1))


def instance_probe(
    encoder: list[str] = ["assets/toyworld/image_encoder", "assets/toyworld/clip"],  # noqa: B006 (never mutated)
    n_train: int = 1000,
    n_test: int = 300,
    n_categories: int = 150,
    seed: int = 0,
    cells: Literal["test", "validation"] = "test",
    out: str | None = None,
) -> None:
    """Instance world: linear probes + 1-NN of image features on held-out instances.

    Args:
        encoder: image-encoder folders, one row each (raw pixels are always the last row)
        n_train: training-distribution instances (probe fit)
        n_test: held-out instances in test cells (2 renders each)
        n_categories: held-out-category instances (2 renders)
        seed: seed of instances, contexts and jitter
        cells: held-out cells probed: test (the gate) or validation (to choose among encoder variants)
        out: also write the result as JSON here
    """
    for name, value in (("n-train", n_train), ("n-test", n_test), ("n-categories", n_categories)):
        check(value >= 5, f"--{name} must be >= 5, got {value}")
    for folder in encoder:
        check(
            (Path(folder) / "config.json").is_file(),
            f"--encoder {folder} is not an image-encoder folder (no config.json)",
        )
    from toyworld.diagnostics.instance_probe import format_table
    from toyworld.diagnostics.instance_probe import instance_probe as measure

    result = measure([*encoder, "pixels"], n_train, n_test, n_categories, seed, cells)
    print(format_table(result))
    if out:
        Path(out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}", file=sys.stderr)


def instance_oracle(
    steps: int = 2000,
    seed: int = 0,
    image_size: int = 64,
    out_dir: str = ".cache/toyworld/instance_oracle",
    contrastive_weight: float = 0.0,
    group: int = 1,
    one_detail: float = 0.0,
    temperature: float = 0.1,
) -> None:
    """Instance world: a DIAGNOSTIC ResNet trained supervised on every instance detail (gate upper bound).

    Args:
        steps: training steps (96 renders each)
        seed: seed of weights, instances and contexts
        image_size: tower input in px (32 px renders, bilinear; >= 32)
        out_dir: writes out-dir/image_encoder
        contrastive_weight: weight of SupCon over instances (two contexts = positives) beside the detail heads;
            0 = off
        group: instances of one category per batch group (>= 1)
        one_detail: fraction of groups whose members differ in one detail
        temperature: SupCon temperature (> 0)
    """
    check(image_size >= 32, f"--image-size must be >= 32 (the renders are 32 px), got {image_size}")
    check(
        contrastive_weight >= 0 and group >= 1 and temperature > 0,
        "--contrastive-weight must be >= 0, --group >= 1 and --temperature > 0",
    )
    check(0 <= one_detail <= 1, f"--one-detail must be in [0, 1], got {one_detail}")
    from toyworld.diagnostics.oracle import train_oracle

    hybrid = {"contrastive_weight": contrastive_weight, "group": group}
    hybrid |= {"one_detail": one_detail, "temperature": temperature}
    print(train_oracle(out_dir, steps, seed=seed, image_size=image_size, **hybrid))


def instance_calibrate(
    prompts: int = 6,
    negatives: int = 3,
    seed: int = 0,
    out: str = "assets/toyworld/instance_calibration.json",
) -> None:
    """Instance world: calibrate the pixel identity threshold on validation, score the reference rows.

    Args:
        prompts: prompt contexts per concept
        negatives: random instances per context (words rows)
        seed: seed of contexts, jitter, noise and random instances
        out: output JSON
    """
    for name, value in (("prompts", prompts), ("negatives", negatives)):
        check(value >= 1, f"--{name} must be >= 1, got {value}")
    from toyworld.diagnostics import calibration as cal
    from toyworld.instance.pixels import IDENTITY_THRESHOLD

    threshold, balanced = cal.calibrate_threshold()
    table = cal.reference_table(prompts, seed, negatives, threshold)
    table["calibration"] = {
        "threshold": threshold,
        "balanced_accuracy_on_validation": balanced,
        "committed_threshold": IDENTITY_THRESHOLD,
        **cal.CALIBRATION,
    }
    Path(out).write_text(json.dumps(table, indent=1) + "\n")
    print(
        f"identity threshold {threshold:.3f} (validation concepts only: same instance vs random same-category "
        f"instances, jitter + noise {cal.CALIBRATION['noise']}; balanced accuracy {balanced:.3f}; "
        f"committed IDENTITY_THRESHOLD {IDENTITY_THRESHOLD:.3f})"
    )
    print(cal.format_table(table))
    print(f"wrote {out}", file=sys.stderr)


def core_probe(
    ckpt: str,
    pretrain_config: list[str] = ["configs/pretrain/instance.yaml"],  # noqa: B006 (never mutated)
    n: int = 64,
    draws: int = 8,
    seed: int = 12345,
) -> None:
    """Diffusion loss on an instance in another context with the encoder's own-timestep, inference-style and
    another same-category instance's predictions (toyworld/diagnostics/core_probe.py).

    Args:
        ckpt: an instance-world pretraining checkpoint (e.g. .../checkpoints/last.ckpt)
        pretrain_config: the config the checkpoint was trained with, then the overlays stacked on it (builds the
            model; default: the committed encoder's)
        n: instances (each needs a same-category partner)
        draws: noise draws averaged (and inference predictions)
        seed: seed of the instances and the noise
    """
    check(Path(ckpt).is_file(), f"checkpoint {ckpt} does not exist")
    for config in pretrain_config:
        check(Path(config).is_file(), f"config {config} does not exist")
    check(n >= 2 and draws >= 1, f"--n must be >= 2 and --draws >= 1, got {n} and {draws}")
    from toyworld.diagnostics.core_probe import core_probe as measure

    try:
        out = measure(ckpt, pretrain_config, n, draws, seed)
    except ValueError as err:  # a checkpoint that does not fit the config: one line, not a traceback
        raise UsageError(str(err)) from err
    print(json.dumps(out))


def instance_score_samples(
    grid: str = "outputs/samples_cross_test2.png",
    concept: str = "cross_test2",
    split: Literal["test", "validation"] = "test",
    scale: int = 3,
) -> None:
    """Instance world: identity from pixels per row of an `evaluate.py sample` grid, against the concept's input.

    Args:
        grid: the PNG `evaluate.py sample` wrote (its .txt beside it names the rows)
        concept: the instance's name in the split's concepts.json
        split: test | validation concept folder
        scale: the grid's upscaling (`evaluate.py sample --scale`)
    """
    from toyworld.instance.commands import CONCEPT_DIRS

    folder = Path(CONCEPT_DIRS[split])
    check(Path(grid).is_file(), f"--grid {grid} does not exist")
    check(
        Path(grid).with_suffix(".txt").is_file(),
        f"--grid {grid} has no {Path(grid).with_suffix('.txt').name} beside it",
    )
    check((folder / f"{concept}.png").is_file(), f"--concept {concept} is not in {folder}")
    check(scale >= 1, f"--scale must be >= 1, got {scale}")
    from toyworld.diagnostics.sample_rows import format_rows, load_png, score_rows

    try:
        rows = score_rows(grid, load_png(folder / f"{concept}.png"), scale)
    except ValueError as err:
        raise UsageError(f"--grid {grid}: {err}") from err
    print(format_rows(rows))


def peft_reference(
    names: list[str] = ["star_val0", "arrow_val0"],  # noqa: B006 (never mutated)
    split: Literal["test", "validation"] = "validation",
    steps: int = 300,
    lr: float = 1e-3,
    rank: int = 16,
    batch_size: int = 4,
    seeds: list[int] = [0],  # noqa: B006 (never mutated)
    latents: Literal["sample", "mean"] = "sample",
    identifier: Literal["words", "sks"] = "words",
    guidance: list[float] = [3.0],  # noqa: B006 (never mutated)
    samples_per_prompt: int = 2,
    pipeline: str = "assets/toyworld/instance_pipeline",
    out: str | None = None,
) -> None:
    """Instance world: a one-image LoRA trained and sampled in plain diffusers + peft, outside the framework.

    The reference our tuning path is compared with (docs/research/peft_reference.md): train_dreambooth_lora.py's
    loop on one image and its caption, sampled by a plain StableDiffusionPipeline from the evaluation's initial
    noise and scored with the evaluation's pixel metric on the evaluation's 4 prompts. A row per concept, seed
    and guidance.

    Args:
        names: concepts of the split's concepts.json
        split: test | validation concept folder (choose settings on validation only)
        steps: optimizer steps
        lr: learning rate (constant)
        rank: LoRA rank and lora_alpha (attention projections to_q, to_k, to_v, to_out.0)
        batch_size: copies of the image per step
        seeds: training seeds, one run each
        latents: sample (the script) | mean (the framework) of the VAE posterior
        identifier: words (the class noun) | sks ("sks <class noun>", a random row of the toy text encoder)
        guidance: classifier-free guidance scales to sample at
        samples_per_prompt: images per prompt
        pipeline: the base model's diffusers folder
        out: also write the rows as CSV here
    """
    from toyworld.instance.commands import CONCEPT_DIRS

    folder = Path(CONCEPT_DIRS[split])
    for name in names:
        check((folder / f"{name}.png").is_file(), f"--names: {name} is not in {folder}")
    for label, value in (
        ("steps", steps),
        ("rank", rank),
        ("batch-size", batch_size),
        ("samples-per-prompt", samples_per_prompt),
    ):
        check(value >= 1, f"--{label} must be >= 1, got {value}")
    check(lr > 0, f"--lr must be > 0, got {lr}")
    check(all(g >= 1.0 for g in guidance), f"--guidance values must be >= 1, got {guidance}")
    check(out is None or not Path(out).is_dir(), f"--out {out} is a folder; give a CSV file path")
    check((Path(pipeline) / "model_index.json").is_file(), f"--pipeline {pipeline} is not a diffusers folder")
    import csv

    import numpy as np

    from toyworld.diagnostics.peft_reference import (
        ReferenceRecipe,
        load_pipeline,
        sample_and_score,
        say,
        train_lora,
    )
    from toyworld.instance.concepts import InstanceConcepts

    placeholder = "<s*>"
    concepts = {c.name: c for c in InstanceConcepts(str(folder), names, 4, 0, 4).load(placeholder)}
    rows = []
    for name in names:
        concept = concepts[name]
        caption = say(
            concept.data_args["templates"][0].format(placeholder), concept.class_noun, placeholder, identifier
        )
        for seed in seeds:
            recipe = ReferenceRecipe(steps, lr, rank, batch_size, seed, latents, identifier)
            pipe = load_pipeline(pipeline)
            losses = train_lora(pipe, concept.load_input(), caption, recipe)
            for g in guidance:
                scores = sample_and_score(pipe, concept, placeholder, identifier, g, samples_per_prompt)
                row = {
                    "concept": name,
                    "seed": seed,
                    "guidance": g,
                    "final_loss": float(np.mean(losses[-20:])),
                }
                row.update(
                    {
                        k: scores[k]
                        for k in (
                            "pixel_identity",
                            "pixel_colour",
                            "pixel_iou",
                            "pixel_pattern",
                            "pixel_prompt_acc",
                        )
                    }
                )
                rows.append(row)
                print(
                    " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
                    flush=True,
                )
    for g in guidance:
        means = {
            k: np.mean([r[k] for r in rows if r["guidance"] == g]) for k in ("pixel_identity", "pixel_colour")
        }
        prompt = np.mean([r["pixel_prompt_acc"] for r in rows if r["guidance"] == g])
        print(
            f"mean at guidance {g:g}: identity {means['pixel_identity']:.3f}, "
            f"colour {means['pixel_colour']:.3f}, prompt {prompt:.3f}"
        )
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with open(out, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


COMMANDS = {
    "probe-image-encoder": probe_image_encoder,
    "instance-probe": instance_probe,
    "instance-oracle": instance_oracle,
    "instance-calibrate": instance_calibrate,
    "core-probe": core_probe,
    "instance-score-samples": instance_score_samples,
    "peft-reference": peft_reference,
}
