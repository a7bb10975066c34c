"""Nothing shared runs code: a checkpoint whose pickle carries a payload is refused unread, in one line.

The payload (``__reduce__`` -> ``open(marker, "w")``) would create the marker file the moment an unrestricted
``torch.load`` unpickled it (:func:`test_the_payload_is_real`). Every command that loads a checkpoint refuses it
with one ``<prog>: error: ...`` line and status 2 before any work, and the marker never appears. Also: the
shareable encoder folder (safetensors + JSON) round-trips and keeps the fingerprint checks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import evaluate
import train
from lightning_modules.checkpoint import (
    CheckpointMismatchError,
    check_checkpoint,
    export_encoder,
    read_checkpoint,
    read_encoder_folder,
)
from lightning_modules.cli import TuningEncoderCLI
from models.weights_only import load_weights_only
from tests.cli_runs import pretrain_args, tune_args


class Payload:
    """Creates ``marker`` when unpickled: what a malicious checkpoint would do (with ``os.system`` instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payload_checkpoint(path: Path, marker: Path, phase: str = "pretrain") -> Path:
    """A file that looks like one of ours (phase, metadata) with the payload beside the weights."""
    meta = {"phase": phase, "base_model": "x", "fingerprint": "0", "personalizer": {}}
    torch.save({"state_dict": {}, "tuning_encoder": meta, "hyper_parameters": {}, "x": Payload(marker)}, path)
    return path


@pytest.fixture
def payload(tmp_path) -> tuple[Path, Path]:
    """(the crafted checkpoint, the marker its payload would create)."""
    marker = tmp_path / "PAYLOAD_RAN"
    return _payload_checkpoint(tmp_path / "shared.ckpt", marker), marker


def _assert_refused(err: str, prog: str, path: Path, marker: Path) -> None:
    line = err.strip()
    if prog == "python -m toyworld":  # argparse prints its usage first, as for every toy-world error
        line = line.splitlines()[-1]
    assert "\n" not in line, line
    assert line.startswith(f"{prog}: error: ") and str(path) in line and "could run code" in line, line
    assert not marker.exists(), "the payload ran"


def test_the_payload_is_real(tmp_path):
    marker = tmp_path / "proof"
    path = _payload_checkpoint(tmp_path / "proof.ckpt", marker)
    torch.load(path, weights_only=False)  # what the loaders did before: the payload runs
    assert marker.exists()


def test_loader_refuses_and_names_what_the_pickle_asks_for(payload):
    path, marker = payload
    with pytest.raises(CheckpointMismatchError, match=r"shared\.ckpt holds more than tensors .*asks for"):
        load_weights_only(path, "checkpoint")
    with pytest.raises(CheckpointMismatchError, match="could run code"):
        read_checkpoint(path, "encoder_checkpoint")
    assert not marker.exists()


def test_tuning_encoder_checkpoint(payload, tiny_sd_dir, index_dir, tmp_path, capsys):
    path, marker = payload
    assert train.cli(["fit", *tune_args(tmp_path, tiny_sd_dir, index_dir, path)]) == 2
    _assert_refused(capsys.readouterr().err, "train.py", path, marker)


def test_pretraining_resume_ckpt_path(payload, tiny_sd_dir, index_dir, tmp_path, capsys):
    path, marker = payload
    args = [*pretrain_args(tmp_path, tiny_sd_dir, index_dir), "--ckpt_path", str(path)]
    assert train.cli(["fit", *args]) == 2
    _assert_refused(capsys.readouterr().err, "train.py", path, marker)


def test_lightning_resumes_weights_only():
    """Lightning's own load of ``--ckpt_path`` gets ``weights_only=True``, whatever was asked."""
    seen = {}

    class Trainer:
        def fit(self, model, **kwargs):
            seen.update(kwargs, model=model)

    cli = TuningEncoderCLI.__new__(TuningEncoderCLI)
    cli.trainer = Trainer()
    cli.fit("model", datamodule="data", ckpt_path="last.ckpt", weights_only=False)
    assert seen == {"model": "model", "datamodule": "data", "ckpt_path": "last.ckpt", "weights_only": True}


def test_evaluate_encoder_checkpoint(payload, tiny_sd_dir, tmp_path, capsys):
    path, marker = payload
    argv = [
        "run",
        "--config",
        "configs/evaluate/tiny.yaml",
        "--pretrained_model_name_or_path",
        str(tiny_sd_dir),
    ]
    argv += ["--image_encoder_name_or_path", str(tiny_sd_dir), "--encoder_checkpoint", str(path)]
    with pytest.raises(SystemExit) as info:
        evaluate.main([*argv, "--out_dir", str(tmp_path / "out")])
    assert info.value.code == 2
    _assert_refused(capsys.readouterr().err, "evaluate.py", path, marker)
    assert not (tmp_path / "out").exists()  # before any work


@pytest.mark.parametrize("command", ["export-encoder", "validate-encoder", "export", "probe", "train"])
def test_toyworld_commands(payload, tmp_path, capsys, command):
    from toyworld.__main__ import main

    path, marker = payload
    config = tmp_path / "world.yaml"  # the toy world's base checkpoint is <out_dir>/last.pt
    config.write_text(yaml.safe_dump({"out_dir": str(tmp_path)}))
    path.rename(tmp_path / "last.pt")
    path = tmp_path / "last.pt"
    argv = {
        "export-encoder": ["export-encoder", "--ckpt", str(path), "--name", "x"],
        "validate-encoder": ["validate-encoder", str(path)],
        "export": ["export", "--config", str(config)],
        "probe": ["probe", "--config", str(config)],
        "train": ["train", "base", "--config", str(config)],
    }[command]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    _assert_refused(capsys.readouterr().err, "python -m toyworld", path, marker)


def test_toyworld_loaders(payload, tmp_path):
    """The loaders themselves (not only the commands' checks) read weights-only."""
    from toyworld.release import assets, instance_assets

    path, marker = payload
    path.rename(tmp_path / "last.pt")
    cfg = {"out_dir": str(tmp_path), "text_encoder_from": str(tmp_path)}
    for load in (
        lambda: assets.export(cfg),
        lambda: assets.probe(cfg),
        lambda: assets.export_encoder(str(tmp_path / "last.pt"), "x", out=tmp_path / "assets"),
        lambda: instance_assets.export_instance(cfg, out=tmp_path / "assets"),
    ):
        with pytest.raises(CheckpointMismatchError, match="could run code"):
            load()
    assert not marker.exists()


# ----- the shareable encoder folder -----
def test_encoder_folder_round_trip_keeps_the_checks(tmp_path, tiny_sd_v_dir):
    from models.backbone import DiffusionBackbone

    ckpt = "assets/toyworld/encoder/date.ckpt"
    folder = export_encoder(ckpt, str(tmp_path / "encoder"))
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    original, shared = read_checkpoint(ckpt), read_encoder_folder(folder)
    assert shared["tuning_encoder"] == original["tuning_encoder"]  # fingerprints, sizes (tuples kept)
    assert shared["state_dict"].keys() == original["state_dict"].keys()
    assert all(torch.equal(v, original["state_dict"][k]) for k, v in shared["state_dict"].items())
    other = DiffusionBackbone.from_pretrained(str(tiny_sd_v_dir), str(tiny_sd_v_dir))
    with pytest.raises(CheckpointMismatchError, match="made on base model"):
        check_checkpoint(read_checkpoint(folder), other, phase="pretrain", source=str(folder))
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointMismatchError, match="not a tuning-encoder folder"):
        read_checkpoint(folder)


def test_encoder_by_hub_id(tmp_path, monkeypatch):
    """A hub id resolves through the hub cache (``models.hub``) to the same folder reader."""
    import models.hub

    folder = export_encoder("assets/toyworld/encoder/date.ckpt", str(tmp_path / "snapshot"))
    monkeypatch.setattr(models.hub, "resolve_model_path", lambda name, **kw: str(folder))
    assert read_checkpoint("someone/date-encoder")["tuning_encoder"]["phase"] == "pretrain"
    with pytest.raises(FileNotFoundError, match="missing.ckpt does not exist"):
        read_checkpoint(tmp_path / "missing.ckpt", "encoder_checkpoint")


def test_export_command_refuses_a_payload(payload, tmp_path, capsys):
    from lightning_modules.checkpoint import main

    path, marker = payload
    assert main([str(path), str(tmp_path / "out")]) == 2
    _assert_refused(capsys.readouterr().err, "python -m lightning_modules.checkpoint", path, marker)
    assert not (tmp_path / "out").exists()


def test_evaluation_identifies_an_encoder_folder_by_its_weights(tmp_path):
    """A rerun of evaluate.py notices a re-exported folder (its weights file changes); a hub id is its name."""
    from evaluation.plan import file_identity

    folder = export_encoder("assets/toyworld/encoder/date.ckpt", str(tmp_path / "encoder"))
    identity = file_identity(folder)
    assert identity["size"] == (folder / "model.safetensors").stat().st_size
    assert file_identity("someone/date-encoder") == {"path": "someone/date-encoder"}


def test_the_exported_curves_span_a_resumed_run(tmp_path):
    """A resume writes a new TensorBoard event file: each curve is all files' values by step (the resumed file's
    value wins at a step both hold), so a run cooled down from an earlier checkpoint reports its whole curve."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    from toyworld.release import assets

    for run, (start, offset) in enumerate([(0, 0.0), (5, 100.0)]):
        writer = SummaryWriter(str(tmp_path / "tb" / f"version_{run}"))
        for step in range(start, start + 10):
            writer.add_scalar("train/loss", offset + step, step)
        writer.close()
        rows = [{"step": step, "identity_a1": offset + step} for step in (start + 4, start + 9)]
        (tmp_path / "tb" / f"version_{run}" / "validation.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rows)
        )
    path = assets.export_encoder(
        "assets/toyworld/encoder/date.ckpt", "x", log_dir=str(tmp_path / "tb"), out=tmp_path / "assets"
    )
    curve = json.loads(path.with_suffix(".json").read_text())["curves"]["train/loss"]
    assert curve["step"] == 14 and curve["first"] == 0.0
    assert curve["mean_last_20"] == pytest.approx((sum(range(5)) + sum(100.0 + s for s in range(5, 15))) / 15)
    validation = json.loads(path.with_suffix(".json").read_text())["validation"]
    assert [(r["step"], r["identity_a1"]) for r in validation] == [(4, 4.0), (9, 109.0), (14, 114.0)]
