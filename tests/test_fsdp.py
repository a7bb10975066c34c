"""FSDP is refused at parse time, in one line with the reason; DDP (the route the docs give) is not.

Why refused rather than supported: Lightning's FSDP precision plugin rejects the recipes'
``gradient_clip_val``; one FSDP flat parameter cannot hold the bf16 frozen backbone and the fp32 LoRA factors;
samples drawn on rank 0 from a sharded UNet deadlock the other ranks; fingerprints hashed from sharded weights
differ from a plain load. Lightning's FSDP2 strategy (``ModelParallelStrategy``) does run 2 gloo processes on CPU
here, but needs a ``configure_model`` sharding plan and an all-rank sampling and fingerprint path in the modules;
until those exist it is refused too (docs/training.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import train
from lightning_modules.cli import resolve_config
from models.errors import ConfigurationError

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SD15 = CONFIGS / "pretrain" / "sd15.yaml"


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    monkeypatch.setattr("sys.argv", ["train.py"])


def _fsdp_presets() -> list[Path]:
    """Every committed config whose trainer strategy names FSDP."""
    found = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        strategy = ((yaml.safe_load(path.read_text()) or {}).get("trainer") or {}).get("strategy")
        if "fsdp" in str(strategy).lower():
            found.append(path)
    return found


def _refused(capsys, args: list[str]) -> str:
    assert train.cli(["fit", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: --trainer.strategy "), err
    assert "FSDP is not supported" in err and "configs/trainer/ddp.yaml" in err, err
    assert "torch_dtype bfloat16" in err and "gradient_checkpointing true" in err, err
    return err


def test_fsdp_preset_exists_and_is_found():
    assert CONFIGS / "trainer" / "fsdp.yaml" in _fsdp_presets()


@pytest.mark.parametrize("preset", _fsdp_presets(), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_fsdp_preset_is_refused_at_parse_time(preset, capsys):
    _refused(capsys, ["--config", str(SD15), "--config", str(preset)])


@pytest.mark.parametrize(
    "strategy",
    [
        "fsdp",
        "fsdp_cpu_offload",
        "lightning.pytorch.strategies.FSDPStrategy",
        "lightning.pytorch.strategies.ModelParallelStrategy",
    ],
)
def test_fsdp_strategies_on_the_command_line_are_refused(strategy, capsys):
    err = _refused(capsys, ["--config", str(SD15), "--trainer.strategy", strategy])
    assert f"--trainer.strategy {strategy}:" in err


def test_resolved_configs_refuse_fsdp_too():
    # evaluate.py and the benchmarks parse tune configs through resolve_config: same check.
    with pytest.raises(ConfigurationError, match="FSDP is not supported"):
        resolve_config([SD15, CONFIGS / "trainer" / "fsdp.yaml"])


def test_ddp_with_a_bf16_backbone_is_accepted():
    cfg = resolve_config([SD15, CONFIGS / "trainer" / "ddp.yaml"])
    assert cfg.trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.DDPStrategy"
    assert cfg.model_kwargs["torch_dtype"] == "bfloat16"


def test_docs_point_to_ddp_not_fsdp():
    for doc in (REPO / "README.md", REPO / "docs" / "training.md"):
        text = doc.read_text()
        assert "or fsdp.yaml" not in text, doc
    training = (REPO / "docs" / "training.md").read_text()
    assert "FSDP is not supported" in training and "gradient_checkpointing" in training
