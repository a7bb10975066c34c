"""The toy world's command line: ``python -m toyworld <command> --help`` for each command's options.

    python -m toyworld sample-prompts --n 4 --seed 0          # base-distribution prompts as JSON lines
    python -m toyworld train checker --config configs/toyworld/checker.yaml   # also: base, clip, image-encoder
    python -m toyworld instance-probe --out probe.json        # the image-branch gate on held-out instances

Each command is a function in its room's ``commands.py``; its signature and docstring are its options
(``toyworld/cli.py``).
"""

from __future__ import annotations

import argparse

from toyworld.cli import build_parser, run
from toyworld.diagnostics.commands import COMMANDS as DIAGNOSTICS
from toyworld.instance.commands import COMMANDS as INSTANCE
from toyworld.named.commands import COMMANDS as NAMED
from toyworld.release.commands import COMMANDS as RELEASE
from toyworld.training.commands import COMMANDS as TRAINING

PROG = "python -m toyworld"
ROOMS = {
    "named world (toyworld/named/)": NAMED,
    "instance world (toyworld/instance/)": INSTANCE,
    "training the world's models (toyworld/training/)": TRAINING,
    "release: assets/toyworld/ (toyworld/release/)": RELEASE,
    "diagnostics, research instruments (toyworld/diagnostics/)": DIAGNOSTICS,
}


def parser() -> argparse.ArgumentParser:
    return build_parser(PROG, (__doc__ or "").split("\n\n")[0] + "\n", ROOMS)


def main(argv: list[str] | None = None) -> None:
    """Runs one command; bad arguments exit with one ``python -m toyworld: error: ...`` line (status 2)."""
    run(parser(), argv)


if __name__ == "__main__":
    main()
