"""The instance world's commands (``python -m toyworld <command> --help``)."""

from __future__ import annotations

import sys
from typing import Literal

from toyworld.cli import check

CONCEPT_DIRS = {
    "test": "assets/toyworld/instance_concepts",
    "validation": "assets/toyworld/instance_validation_concepts",
}


def instance_render(n: int = 16, seed: int = 0, out: str = "instance_grid.png") -> None:
    """Instance world: N training scenes in a PNG grid, captions printed.

    Args:
        n: number of scenes
        seed: random seed (batch 0 of the training stream)
        out: output PNG
    """
    check(n >= 1, f"--n must be >= 1, got {n}")
    from evaluation.generate.images import save_grid
    from toyworld.instance.stream import InstanceWorldStream

    batch = InstanceWorldStream(n, seed=seed, empty_prob=0.0, drop_prob=0.0).batch(0)
    save_grid(((batch["pixels"].permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy(), out)
    for c in batch["captions"]:
        print(c)
    print(f"wrote {out}", file=sys.stderr)


def instance_concepts(
    split: Literal["test", "validation"] = "test", out: str | None = None, times: int = 1
) -> None:
    """Instance world: write a split's concept images and concepts.json.

    Args:
        split: which concept set
        out: output folder (default assets/toyworld/instance_concepts or .../instance_validation_concepts)
        times: validation only: this many instances per entry of the split's plan (3: the 24 concepts of
            assets/toyworld/instance_validation_concepts_24, whose first of each entry are the 8 of times 1)
    """
    from toyworld.instance.concepts import write_instance_concepts

    ok = times == 1 or (times > 1 and split == "validation")
    check(
        ok,
        f"--times {times}: must be >= 1, and more than 1 only with --split validation (the test set is fixed)",
    )
    print(write_instance_concepts(out or CONCEPT_DIRS[split], split, times))


COMMANDS = {"instance-render": instance_render, "instance-concepts": instance_concepts}
