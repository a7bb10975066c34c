"""Helpers of tests/test_user_errors.py: the real commands as subprocesses, and what a failed run must leave.

Each case runs ``python train.py ...`` or ``python evaluate.py ...`` on the committed toy world (1-3 tuning steps)
and checks the promise of the README's "Errors and safety": status 2, at most two lines after the start-up
lines, the message naming the file or value, no saved file changed (sha256), no temporary left, modes from the
umask.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TOY_TUNE = REPO / "configs" / "tune" / "toyworld.yaml"
TOY_PRETRAIN = REPO / "configs" / "pretrain" / "toyworld.yaml"
TOY_PIPELINE = REPO / "assets" / "toyworld" / "pipeline"
CONCEPT = "red_striped_star"  # the toy tuning config's image
TEMP_NAME = re.compile(r"^\..*(\.tmp-\d+-|\.tmp$)")


def run(script: str, args: list[str], cwd: Path = REPO, preexec_fn=None) -> subprocess.CompletedProcess:
    """``python <script> <args>`` from ``cwd`` (the repository's scripts by absolute path), offline, one thread."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
    }
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        preexec_fn=preexec_fn,
    )


def tune_args(root: Path, export_dir: Path, index: Path, steps: int = 1, *extra: str) -> list[str]:
    """``fit`` on the toy world's tuning config: ``steps`` steps, one noise draw, no logger, exports into
    ``export_dir``."""
    return [
        "fit",
        "--config",
        str(TOY_TUNE),
        "--trainer.max_steps",
        str(steps),
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--trainer.default_root_dir",
        str(root),
        "--model.init_args.init_noise_draws",
        "1",
        "--model.init_args.token_index_cache",
        str(index),
        "--model.init_args.export_dir",
        str(export_dir),
        *extra,
    ]


def error_lines(proc: subprocess.CompletedProcess, prog: str) -> list[str]:
    """The stderr lines from the first ``<prog>: error:`` on (the start-up lines before it are not counted)."""
    lines = proc.stderr.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(f"{prog}: error:")), None)
    assert first is not None, f"exit {proc.returncode}, no '{prog}: error:' line:\n{proc.stderr[-3000:]}"
    return lines[first:]


def assert_user_error(proc: subprocess.CompletedProcess, prog: str, *needles: str) -> str:
    """Status 2, no traceback, at most 2 lines from the error on, each of ``needles`` in the message."""
    assert proc.returncode == 2, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = error_lines(proc, prog)
    assert len(lines) <= 2, "\n".join(lines)
    message = lines[0]
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"
    return message


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def tree(folder: Path) -> dict[str, tuple[str, int]]:
    """``{relative path: (sha256, mode)}`` of every file under ``folder`` (folders: ``("dir", mode)``)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        mode = path.stat().st_mode & 0o777
        rel = str(path.relative_to(folder))
        out[rel] = ("dir", mode) if path.is_dir() else (hashlib.sha256(path.read_bytes()).hexdigest(), mode)
    return out


def temporaries(folder: Path) -> list[str]:
    return [str(p.relative_to(folder)) for p in folder.rglob(".*") if TEMP_NAME.match(p.name)]


def assert_umask_modes(folder: Path) -> None:
    """Every file and folder under ``folder`` has the mode ``open`` / ``mkdir`` give under this umask."""
    mask = umask()
    for rel, (kind, mode) in tree(folder).items():
        want = (0o777 if kind == "dir" else 0o666) & ~mask
        assert mode == want, f"{rel}: mode {oct(mode)}, expected {oct(want)} (umask {oct(mask)})"
