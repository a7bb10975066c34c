"""train.py as a command: the project's own errors in one line (status 2), others with their traceback; concept
image size checks; the kohya export flag of a tuning run."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from datamodules import ConceptDataModule, ImageTooSmallError, SmallImageWarning
from datamodules.transforms import min_image_side
from models.artifact import ConceptArtifact
from models.errors import TuningEncoderError
from tests.cli_runs import REPO, fit, tune_args


def _train(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "train.py", "fit", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _image_args(tmp_path, tiny_sd_dir, index_dir, image) -> list[str]:
    args = tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=1, variant="textual_inversion")
    args += ["--data.init_args.synthetic_concept", "null", "--data.init_args.image", str(image)]
    return [*args, "--data.init_args.class_noun", "teapot"]  # textual inversion starts from the class noun


def _assert_one_line_error(proc: subprocess.CompletedProcess, match: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert match in lines[0], lines[0]
    return lines[0]


@pytest.mark.slow
def test_unreadable_image_is_one_line_with_status_2(tiny_sd_dir, index_dir, tmp_path):
    bad = tmp_path / "teapot.png"
    bad.write_bytes(b"not a png at all")
    proc = _train(_image_args(tmp_path, tiny_sd_dir, index_dir, bad))
    _assert_one_line_error(proc, f"cannot load image {bad}")


@pytest.mark.slow
def test_one_pixel_image_is_refused_in_one_line(tiny_sd_dir, index_dir, tmp_path):
    tiny = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (200, 30, 30)).save(tiny)
    proc = _train(_image_args(tmp_path, tiny_sd_dir, index_dir, tiny))
    line = _assert_one_line_error(proc, "is 1x1 px, too small for resolution 32")
    assert ">= 16 px" in line


@pytest.mark.slow
def test_missing_encoder_checkpoint_is_one_line_with_status_2(tiny_sd_dir, index_dir, tmp_path):
    proc = _train(tune_args(tmp_path, tiny_sd_dir, index_dir, tmp_path / "missing.ckpt", steps=1))
    _assert_one_line_error(proc, f"encoder_checkpoint {tmp_path / 'missing.ckpt'} does not exist")


@pytest.mark.slow
def test_unexpected_errors_keep_their_traceback(tiny_sd_dir, index_dir, tmp_path):
    # Not one of the project's errors (Lightning refuses an accelerator this machine lacks): a traceback, status 1.
    args = tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=1, variant="textual_inversion")
    proc = _train([*args, "--trainer.accelerator", "mps"])
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" in proc.stderr
    assert "train.py: error:" not in proc.stderr


def test_project_errors_share_one_base_type():
    from datamodules import ImageLoadError
    from lightning_modules.checkpoint import CheckpointMismatchError
    from models.errors import ConfigurationError, MissingFileError
    from models.hub import ModelNotAvailableError
    from models.placeholder import PlaceholderError

    for err in (ImageLoadError, CheckpointMismatchError, ModelNotAvailableError, PlaceholderError):
        assert issubclass(err, TuningEncoderError), err
    assert issubclass(ImageTooSmallError, TuningEncoderError) and issubclass(ImageTooSmallError, ValueError)
    assert issubclass(MissingFileError, FileNotFoundError) and issubclass(ConfigurationError, ValueError)


# ----- image size -----
def _png(tmp_path, w: int, h: int):
    path = tmp_path / f"img_{w}x{h}.png"
    Image.new("RGB", (w, h), (30, 120, 200)).save(path)
    return path


def test_min_image_side_is_a_quarter_of_the_resolution_and_at_least_16():
    assert min_image_side(512) == 128 and min_image_side(768) == 192
    assert min_image_side(32) == 16 and min_image_side(64) == 16
    assert min_image_side(8) == 8  # never above the resolution itself


def test_image_below_the_floor_is_refused_with_size_and_resolution(tmp_path):
    with pytest.raises(ImageTooSmallError, match=r"is 1x1 px, too small for resolution 32: .* >= 16 px"):
        ConceptDataModule(image=str(_png(tmp_path, 1, 1)), resolution=32)
    with pytest.raises(ImageTooSmallError, match=r"is 15x40 px"):  # the short side decides
        ConceptDataModule(image=str(_png(tmp_path, 15, 40)), resolution=32)


def test_image_below_the_resolution_warns_with_size_and_resolution(tmp_path):
    with pytest.warns(SmallImageWarning, match=r"is 20x24 px, smaller than the model's resolution 32"):
        dm = ConceptDataModule(image=str(_png(tmp_path, 20, 24)), resolution=32)
    assert dm.concept_image.size == (20, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallImageWarning)
        ConceptDataModule(image=str(_png(tmp_path, 32, 48)), resolution=32)


# ----- the export flag of a tuning run -----
@pytest.mark.slow
def test_tuning_run_writes_kohya_files_when_asked(tiny_sd_dir, index_dir, tmp_path):
    # One-shot LoRA (no encoder checkpoint needed); 2 steps at a high lr make the LoRA clearly non-zero.
    opt = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05, "weight_decay": 0.0}}
    model = {"export_kohya": True, "optimizer": opt}
    cli = fit(tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=2, variant="lora", model=model))
    artifact = ConceptArtifact.load(cli.model.artifact_path)
    name = cli.model.artifact_path.stem
    folder = cli.model.artifact_path.with_name(f"{name}_kohya")
    assert {p.name for p in folder.iterdir()} == {
        f"{name}_lora.safetensors",
        f"{name}.safetensors",
        f"{name}.pt",
    }
    sd = load_file(str(folder / f"{name}_lora.safetensors"))
    deltas = [up @ down for down, up in artifact.lora.values()]
    assert max(float(d.abs().max()) for d in deltas) > 1e-3
    for path, (down, up) in artifact.lora.items():
        key = "lora_unet_" + path.replace(".", "_")
        scale = float(sd[f"{key}.alpha"]) / sd[f"{key}.lora_down.weight"].shape[0]
        merged = scale * sd[f"{key}.lora_up.weight"] @ sd[f"{key}.lora_down.weight"]
        torch.testing.assert_close(merged, up @ down, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(
        load_file(str(folder / f"{name}.safetensors"))["emb_params"][0], artifact.v_star
    )


def test_export_kohya_is_documented_in_help(capsys):
    """In-process: the parser prints the help (a fresh interpreter only cost 5 s of imports)."""
    with pytest.raises(SystemExit) as exc:
        train.main(["fit", "--model.help", "lightning_modules.ConceptTuning"])
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-3000:]
    assert "--model.export_kohya {true,false}" in out.out
    assert "kohya's" in out.out and "emb_params" in out.out


@pytest.mark.slow
def test_tuning_checks_the_image_against_the_models_resolution(tiny_sd_dir, index_dir, tmp_path):
    # The data is configured at 16 px, so the datamodule accepts a 20 px image silently; the model is at 32 px.
    args = _image_args(tmp_path, tiny_sd_dir, index_dir, _png(tmp_path, 20, 20))
    args += ["--data.init_args.resolution", "16"]
    with pytest.warns(SmallImageWarning, match=r"20x20 px, smaller than the model's resolution 32"):
        fit(args)
