"""A run prints what it did and nothing else: the toy world's 12-step tuning and its sampling, and the quickstart's
pretraining step, as subprocesses (the libraries' notices are emitted at import time, before any in-process test
could catch them)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from models.artifact import ConceptArtifact

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tune" / "toyworld.yaml"


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, timeout=900)
    # decoded by hand: text=True would turn a progress bar's carriage returns into line breaks
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode())


def noisy(text: str) -> list[str]:
    """Lines that warn or announce a deprecation (transformers' "`torch_dtype` is deprecated!" says neither "warn"
    nor "Warning")."""
    return [line for line in text.split("\n") if re.search("warn|deprecat", line, re.IGNORECASE)]


def lines(text: str) -> list[str]:
    """Lines as a terminal shows them: a progress bar's carriage-return updates overwrite one line."""
    return [line for line in text.split("\n") if line.strip()]


@pytest.fixture(scope="module")
def tuning_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("quiet")
    proc = run(
        [
            str(REPO / "train.py"),
            "fit",
            "--config",
            str(CONFIG),
            "--model.init_args.export_dir",
            str(out / "concepts"),
            "--trainer.default_root_dir",
            str(out / "run"),
            "--trainer.logger.init_args.save_dir",
            str(out / "run"),
            "--model.init_args.token_index_cache",
            str(out / "index"),
        ],
        cwd=REPO,
    )
    return proc, out


@pytest.mark.slow
def test_tuning_run_is_quiet_and_says_what_it_did(tuning_run):
    proc, out = tuning_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not noisy(proc.stdout + proc.stderr), proc.stderr
    shown = lines(proc.stdout) + lines(proc.stderr)
    assert len(shown) <= 15, "\n".join(shown)
    text = proc.stdout + proc.stderr
    artifact = out / "concepts" / "red_striped_star.safetensors"
    assert artifact.is_file()
    nearest = ConceptArtifact.load(str(artifact)).nearest_token
    assert "red_striped_star" in text
    assert "12 steps" in text
    assert re.search(r"loss: .*\d\.\d+ -> .*\d\.\d+", text), text  # loss start -> end
    assert repr(nearest) in text
    assert str(artifact) in text and str(out / "concepts" / "red_striped_star_diffusers") in text
    # the bar counts optimizer steps, to the run's max_steps (Lightning's own read "Epoch 0/-2")
    assert "12/12" in proc.stderr and "/-2" not in text
    assert "Total FLOPs" not in text and "Seed set" not in text


@pytest.mark.slow
def test_sampling_says_where_the_grid_is(tuning_run, tmp_path):
    _, out = tuning_run
    grid = tmp_path / "grid.png"
    proc = run(
        [
            str(REPO / "evaluate.py"),
            "sample",
            "--concept",
            str(out / "concepts" / "red_striped_star.safetensors"),
            "--out",
            str(grid),
            "--prompts",
            '["a small <s*> on the left on a yellow background"]',
            "--samples_per_prompt",
            "2",
            "--num_inference_steps",
            "4",
        ],
        cwd=REPO,  # the artefact names its base model as the tuning config did: relative to the repository
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert grid.is_file()
    assert f"wrote {grid}" in proc.stdout
    assert proc.stderr.strip() == "", proc.stderr
    assert not noisy(proc.stdout), proc.stdout


@pytest.mark.slow
def test_the_quickstarts_pretraining_step_reports_like_tuning_and_checkpoints(tmp_path):
    """The quickstart's step 1 (``train.py fit --config configs/pretrain/instance.yaml --config
    configs/pretrain/instance_modules.yaml --trainer.max_steps N``), 2 steps, run from a folder holding links to the
    repository's assets and configs so that its outputs land there. It says what tuning says: one bar over the
    steps, the loss start -> end, where its files are; no model-summary table, no epoch bars, no warning. The
    checkpoint holds the encoder with the committed encoder's shapes."""
    import torch

    for name in ("assets", "configs"):
        (tmp_path / name).symlink_to(REPO / name)
    configs = [
        "--config",
        "configs/pretrain/instance.yaml",
        "--config",
        "configs/pretrain/instance_modules.yaml",
    ]
    proc = run([str(REPO / "train.py"), "fit", *configs, "--trainer.max_steps", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert not noisy(text), text
    assert "Total FLOPs" not in text and "Trainable params" not in text and "Epoch" not in text, text
    assert "pretrain" in proc.stderr and "2/2" in proc.stderr, proc.stderr
    assert re.search(r"loss: .*\d\.\d+ -> .*\d\.\d+", text), text
    out = Path("outputs") / "pretrain_instance_modules"
    assert f"checkpoints: {out / 'checkpoints' / 'last.ckpt'}" in text, text
    assert f"tensorboard --logdir {out}" in text, text
    assert len(lines(proc.stdout) + lines(proc.stderr)) <= 8, text
    state = torch.load(tmp_path / out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    committed = torch.load(
        REPO / "assets/toyworld/instance_encoder/date_modules_trunk64.ckpt",
        map_location="cpu",
        weights_only=True,
    )
    shapes = {k: v.shape for k, v in committed["state_dict"].items()}
    assert {k: v.shape for k, v in state["state_dict"].items() if k in shapes} == shapes
    assert list((tmp_path / out / "tb").rglob("events.out.tfevents.*"))


@pytest.mark.slow
def test_verbose_keeps_the_libraries_notices(tmp_path):
    """The notices are silenced by message, only on request: ``--verbose`` shows them again."""
    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed: transformers has no fallback notice to show")
    quiet = run([str(REPO / "evaluate.py"), "sample"], cwd=tmp_path)
    verbose = run([str(REPO / "evaluate.py"), "sample", "--verbose"], cwd=tmp_path)
    for proc in (quiet, verbose):  # no concept: the one-line error, status 2
        assert proc.returncode == 2
        assert proc.stderr.strip().split("\n")[-1].startswith("evaluate.py: error: sample needs --concept")
    assert "requires torchvision" not in quiet.stderr
    assert "requires torchvision" in verbose.stderr
