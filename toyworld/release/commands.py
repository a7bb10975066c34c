"""Assembling and describing ``assets/toyworld/`` (``python -m toyworld <command> --help``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from toyworld.cli import Repeated, Required, check, check_checkpoint, load_checked_config


def export(config: Repeated) -> None:
    """Assemble assets/toyworld/ from the trained models (and measure them).

    Args:
        config: configs/toyworld/base.yaml
    """
    cfg = load_checked_config(config)
    from toyworld.release import assets

    assets.export(cfg)


def card(config: Repeated) -> None:
    """Rewrite assets/toyworld/README.md from the measured metrics.

    Args:
        config: configs/toyworld/base.yaml
    """
    cfg = load_checked_config(config)
    from toyworld.release import assets

    assets.write_card(assets.ASSETS, cfg)


def probe(config: Repeated) -> None:
    """Checker-read adherence of the current base checkpoint.

    Args:
        config: configs/toyworld/base.yaml
    """
    cfg = load_checked_config(config)
    from toyworld.release import assets

    assets.probe(cfg)


def export_instance(config: Repeated) -> None:
    """Instance world: write assets/toyworld/instance_pipeline/ from its base checkpoint.

    Args:
        config: configs/toyworld/base.yaml, then configs/toyworld/instance_base.yaml (later wins)
    """
    cfg = load_checked_config(config)
    from toyworld.release.instance_assets import export_instance as write

    print(write(cfg))


def export_encoder(
    ckpt: Required,
    name: Required,
    log_dir: str | None = None,
    fp16: bool = False,
    folder: Literal["encoder", "instance_encoder"] = "encoder",
) -> None:
    """Write a pretraining checkpoint's weights to assets/toyworld/encoder/.

    Args:
        ckpt: the pretraining checkpoint (e.g. .../last.ckpt)
        name: date or no_regularizer
        log_dir: its TensorBoard folder (final curve values)
        fp16: store the weights in float16 (half the bytes)
        folder: under assets/toyworld/
    """
    if not Path(ckpt).is_dir():  # an encoder folder holds no pickle
        check_checkpoint(ckpt)  # before any work: one line if it could run code
    from toyworld.release.assets import export_encoder as write

    print(write(ckpt, name, log_dir, folder=folder, fp16=fp16))


def figures(run: str, concept: str = "red_striped_star", out: str = "assets/toyworld/results") -> None:
    """Copy an evaluation's plots into assets/toyworld/results/ and draw a concept.

    Args:
        run: the evaluation's out_dir
        concept: the concept drawn across methods
        out: output folder
    """
    check((Path(run) / "results.csv").is_file(), f"{run} holds no results.csv (an evaluate.py run's out_dir)")
    from toyworld.release.figures import write_figures

    print(write_figures(Path(run), concept, Path(out)))


def instance_adherence(
    n: int = 128,
    seed: int = 0,
    pipeline: str = "assets/toyworld/instance_pipeline",
    out: str | None = None,
    grid: str | None = None,
) -> None:
    """Instance world: the base model's prompt accuracy and diversity from pixels.

    Args:
        n: captions sampled (twice each, two seeds)
        seed: caption and sampling seed
        pipeline: base model folder (diffusers layout)
        out: also write the result as JSON here
        grid: also write a PNG: per caption, a training render and the two samples
    """
    check(n >= 2, f"--n must be >= 2, got {n}")
    check(
        (Path(pipeline) / "model_index.json").is_file(),
        f"--pipeline {pipeline} is not a pipeline folder (no model_index.json)",
    )
    from toyworld.release.instance_assets import instance_adherence as measure

    result = json.dumps(measure(n, seed, pipeline, grid=grid), indent=1)
    if out:
        Path(out).write_text(result + "\n")
    print(result)


def instance_ceiling(
    concepts: str = "assets/toyworld/instance_concepts", pipeline: str = "assets/toyworld/instance_pipeline"
) -> None:
    """Instance world: identity of the concepts' inputs after an autoencoder round trip.

    Args:
        concepts: concept folder
        pipeline: base model folder
    """
    check(
        (Path(concepts) / "concepts.json").is_file(),
        f"--concepts {concepts} is not a concept folder (no concepts.json)",
    )
    check(
        (Path(pipeline) / "vae" / "config.json").is_file(),
        f"--pipeline {pipeline} holds no autoencoder (no vae/config.json)",
    )
    from toyworld.release.instance_assets import autoencoder_ceiling

    print(json.dumps(autoencoder_ceiling(concepts, pipeline)))


COMMANDS = {
    "export": export,
    "card": card,
    "probe": probe,
    "export-instance": export_instance,
    "export-encoder": export_encoder,
    "figures": figures,
    "instance-adherence": instance_adherence,
    "instance-ceiling": instance_ceiling,
}
