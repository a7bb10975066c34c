"""Helpers and fixtures of the CLI-driven training tests (test_training, test_exports_and_errors).

Registered as a pytest plugin by ``conftest.py``, so its fixtures are shared: the token-index cache and the
pretraining checkpoint once per session (every reader only reads them), the rest once per test module.
"""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

import train

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "tiny.yaml"
TUNE = REPO / "configs" / "tune" / "tiny.yaml"
PROMPT = "a photo of a <s*>"
_overlay_ids = itertools.count()


# ----- fixtures and helpers -----
@pytest.fixture(scope="module", autouse=True)
def cli_environment():
    """One intra-op thread (two threads per process thrash 2 shared cores; measured 5x slower) and a plain
    ``sys.argv`` (LightningCLI warns when it also sees pytest's arguments)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train.py"])
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def index_dir(tmp_path_factory) -> Path:
    """Token-index cache shared by the runs of the session (a cache: a run reads it or adds an entry)."""
    return tmp_path_factory.mktemp("token_index")


def _overlay(root: Path, trainer: dict, model: dict, data: dict) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"overlay_{next(_overlay_ids)}.yaml"
    path.write_text(
        yaml.safe_dump({"trainer": trainer, "model": {"init_args": model}, "data": {"init_args": data}})
    )
    return ["--config", str(path)]


def _trainer(root: Path, steps: int, checkpoint_every: int | None, **extra) -> dict:
    callbacks = []
    if checkpoint_every:
        callbacks.append(
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {
                    "dirpath": str(root / "ckpt"),
                    "filename": "{step}",
                    "every_n_train_steps": checkpoint_every,
                    "save_top_k": -1,
                    "save_last": True,
                },
            }
        )
    return {
        "max_steps": steps,
        "default_root_dir": str(root),
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": bool(callbacks),
        "callbacks": callbacks,
        "log_every_n_steps": 1,
        "logger": {
            "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(root), "name": "tb"},
        },
        **extra,
    }


#: ``model`` overrides of a short DreamBooth run on the tiny backbone (``tune: [unet]``, a rate that moves it in
#: a few steps): tests/test_dreambooth.py and tests/test_prior_preservation.py.
DREAMBOOTH = {
    "encoder_checkpoint": None,
    "tune": ["unet"],
    "init": "class_noun",
    "alpha": 1.0,
    "nn_weight": 0.0,
    "method": "dreambooth",
    "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.02, "weight_decay": 0.0}},
}


def pretrain_args(
    root: Path,
    sd: Path,
    index: Path,
    steps: int = 2,
    checkpoint_every: int | None = None,
    model: dict | None = None,
    data: dict | None = None,
    **trainer,
) -> list[str]:
    """``--config`` arguments: the committed tiny pretraining config + an overlay into ``root``."""
    m = {
        "pretrained_model_name_or_path": str(sd),
        "image_encoder_name_or_path": str(sd),
        "token_index_cache": str(index),
        "sample_every_n_steps": 0,
        **(model or {}),
    }
    d = {"batch_size": 4, **(data or {})}
    return [
        "--config",
        str(PRETRAIN),
        *_overlay(root, _trainer(root, steps, checkpoint_every, **trainer), m, d),
    ]


def tune_args(
    root: Path,
    sd: Path,
    index: Path,
    encoder_checkpoint: Path | None,
    steps: int = 3,
    variant: str | None = None,
    model: dict | None = None,
    **trainer,
) -> list[str]:
    """The committed tiny tuning config (+ the method overlay ``configs/tune/methods/<variant>.yaml``, or the
    both-phase ``no_regularizer`` ablation's tiny overlay) + an overlay into ``root``."""
    m = {
        "pretrained_model_name_or_path": str(sd),
        "image_encoder_name_or_path": str(sd),
        "token_index_cache": str(index),
        "export_dir": str(root / "concepts"),
        **(model or {}),
    }
    if encoder_checkpoint is not None:
        m["encoder_checkpoint"] = str(encoder_checkpoint)
    configs = ["--config", str(TUNE)]
    if variant is not None:
        overlay = TUNE.parent / "methods" / f"{variant}.yaml"
        if variant == "no_regularizer":
            overlay = TUNE.parents[1] / "experiments" / "no_regularizer" / "tune_tiny.yaml"
        configs += ["--config", str(overlay)]
    # `steps: ${trainer.max_steps}` resolves inside tiny.yaml, so the overlay sets the epoch length itself.
    d = {"steps": max(steps, 1)}
    return [*configs, *_overlay(root, _trainer(root, steps, None, **trainer), m, d)]


def fit(args: list[str], *callbacks: Callback):
    """Parses and instantiates like ``train.py fit``, adds test callbacks, fits; returns the CLI."""
    cli = train.main(args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli


class Snapshot(Callback):
    """Copies of the backbone at fit start and of every parameter when training starts (after
    ``ConceptTuning`` has set v* and the cores from its initialisation)."""

    params: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self.backbone = {k: v.clone() for k, v in pl_module.backbone.state_dict().items()}

    def on_train_start(self, trainer, pl_module) -> None:
        self.params = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def moved(module, before: dict[str, torch.Tensor]) -> set[str]:
    return {n for n, p in module.named_parameters() if not torch.equal(p.detach(), before[n])}


def is_unet_lora(name: str) -> bool:
    """A parameter of the peft LoRA adapter the one-shot LoRA baseline adds inside the frozen UNet."""
    return ".lora_A." in name or ".lora_B." in name


def assert_backbone_unchanged(module, snapshot: Snapshot, adapter: bool = False) -> None:
    """Every frozen backbone weight is unchanged; with ``adapter`` the peft LoRA weights are exempt (and exist)."""
    after = module.backbone.state_dict()
    assert after.keys() == snapshot.backbone.keys()
    assert adapter == any(is_unet_lora(k) for k in after)
    changed = [
        k for k, v in after.items() if not torch.equal(v, snapshot.backbone[k]) and not is_unet_lora(k)
    ]
    assert not changed, f"frozen backbone changed: {changed[:5]}"


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def nan_unet(module):
    """Makes the frozen UNet's forward return NaN (a forward hook; our own code runs unchanged)."""

    def hook(unet, args, output):
        return type(output)(sample=output.sample * float("nan"))

    return module.backbone.unet.register_forward_hook(hook)


@pytest.fixture(scope="session")
def pretrain_ckpt(tiny_sd_dir, index_dir, tmp_path_factory) -> Path:
    """``last.ckpt`` of a 2-step pretraining run through ``train.py fit``, reused by the tuning tests of every
    module (read-only: a test that changes it works on a copy)."""
    root = tmp_path_factory.mktemp("pretrain")
    # Built before the module-scoped cli_environment applies: the same plain argv and one thread here.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "argv", ["train.py"])
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            train.main(["fit", *pretrain_args(root, tiny_sd_dir, index_dir, steps=2, checkpoint_every=2)])
        finally:
            torch.set_num_threads(threads)
    path = root / "ckpt" / "last.ckpt"
    assert path.is_file()
    return path


@pytest.fixture(scope="module")
def tuned(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path_factory):
    """A finished DATE tuning run (3 steps; a high lr makes the LoRA cores clearly non-zero)."""
    root = tmp_path_factory.mktemp("tuned")
    opt = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05, "weight_decay": 0.0}}
    cli = fit(tune_args(root, tiny_sd_dir, index_dir, pretrain_ckpt, steps=3, model={"optimizer": opt}))
    return cli.model
