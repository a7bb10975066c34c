"""The named world's commands (``python -m toyworld <command> --help``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from toyworld.cli import UsageError, check, check_checkpoint
from toyworld.common.pipeline import CHECKER_DIR, GUIDANCE, PIPELINE_DIR, SAMPLE_STEPS


def sample_prompts(n: int = 8, seed: int = 0) -> None:
    """Print N base-distribution prompts as JSON lines.

    Args:
        n: number of prompts
        seed: random seed
    """
    check(n >= 1, f"--n must be >= 1, got {n}")
    from toyworld.named import world

    for row in world.sample_prompts(n, seed):
        sys.stdout.write(json.dumps(row) + "\n")


def render(
    n: int = 16, seed: int = 0, split: Literal["base", "all"] = "all", out: str = "toyworld_grid.png"
) -> None:
    """Render N random scenes into a PNG grid and print their captions.

    Args:
        n: number of scenes
        seed: random seed
        split: scene distribution
        out: output PNG
    """
    check(n >= 1, f"--n must be >= 1, got {n}")
    from evaluation.generate.images import save_grid
    from toyworld.named import world

    images, scenes = world.render_batch(world.seeded_rng(seed, 0x72656E64), n, split)
    save_grid(images, out)
    for s in scenes:
        print(world.caption(s))
    print(f"wrote {out}", file=sys.stderr)


def write_concepts(out: str = "assets/toyworld/concepts") -> None:
    """Write the held-out concepts' input images and concepts.json.

    Args:
        out: output folder
    """
    from toyworld.named import world

    print(world.write_concepts(out))


def write_validation_concepts(out: str = "assets/toyworld/validation_concepts", novel: int = 0) -> None:
    """Write the validation concepts' images and concepts.json.

    Args:
        out: output folder
        novel: novel-shape validation concepts to add after the 8 base-distribution ones (hearts and moons in
            looks no test concept has; assets/toyworld/validation_concepts_novel holds 4)
    """
    from toyworld.named.validation import write_validation_concepts as write

    print(write(out, novel=novel))


def validate_encoder(
    ckpt: str,
    pretrain_config: list[str] = ["configs/pretrain/toyworld.yaml"],  # noqa: B006 (never mutated)
) -> None:
    """Encoder-only identity of a pretraining checkpoint on the validation concepts.

    Args:
        ckpt: a pretraining checkpoint (e.g. outputs/pretrain_toyworld/checkpoints/last.ckpt)
        pretrain_config: its pretraining config, then the overlays stacked on it
    """
    if not Path(ckpt).is_dir():  # an encoder folder holds no pickle
        check_checkpoint(ckpt)  # before any work: one line if it could run code
    from toyworld.named.validation import measure_checkpoint

    try:  # a checkpoint trained with another config: one line
        print(json.dumps(measure_checkpoint(ckpt, pretrain_config), indent=1))
    except ValueError as err:
        raise UsageError(str(err)) from err


def base_adherence(
    n: int = 256,
    seed: int = 0,
    pipeline: str = str(PIPELINE_DIR),
    checker: str = str(CHECKER_DIR),
    steps: int = SAMPLE_STEPS,
    guidance: float = GUIDANCE,
) -> None:
    """Checker accuracy of base-model samples per attribute.

    Args:
        n: number of prompts
        seed: prompt and sampling seed
        pipeline: base model folder (diffusers layout)
        checker: attribute checker folder
        steps: DDIM steps
        guidance: classifier-free guidance scale
    """
    check(n >= 1, f"--n must be >= 1, got {n}")
    for name, folder, marker in (
        ("pipeline", pipeline, "model_index.json"),
        ("checker", checker, "config.json"),
    ):
        check((Path(folder) / marker).exists(), f"--{name} {folder} is not a {name} folder")
    from toyworld.named.measure import base_adherence as measure

    sys.stdout.write(json.dumps(measure(n, seed, pipeline, checker, steps, guidance)) + "\n")


COMMANDS = {
    "sample-prompts": sample_prompts,
    "render": render,
    "write-concepts": write_concepts,
    "write-validation-concepts": write_validation_concepts,
    "validate-encoder": validate_encoder,
    "base-adherence": base_adherence,
}
