"""Every committed training config parses through the real CLI, and ``--help`` documents the options.

Configs for real Stable Diffusion weights name hub ids that are not available offline, so configs are only
PARSED here (``--print_config`` exits before anything is instantiated); the tiny configs are instantiated and
run by ``test_training.py``. ``configs/backbone`` and ``configs/evaluate`` are not ``train.py`` configs and are
tested elsewhere.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def _base_of(path: Path) -> Path | None:
    """``<base>_<variant>.yaml`` overlays need ``<base>.yaml`` of the same folder (longest such prefix)."""
    parts = path.stem.split("_")
    for i in range(len(parts) - 1, 0, -1):
        base = path.with_name("_".join(parts[:i]) + ".yaml")
        if base.is_file():
            return base
    return None


def _config_sets() -> list[tuple[Path, ...]]:
    sets: list[tuple[Path, ...]] = []
    for phase in ("pretrain", "tune"):
        for path in sorted((CONFIGS / phase).glob("*.yaml")):
            base = _base_of(path)
            sets.append((base, path) if base is not None else (path,))
    for path in sorted((CONFIGS / "trainer").glob("*.yaml")):
        sets.append((CONFIGS / "pretrain" / "tiny.yaml", path))
    return sets


CONFIG_SETS = _config_sets()


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr("sys.argv", ["train.py"])


def _cli_args(paths: tuple[Path, ...]) -> list[str]:
    return [arg for p in paths for arg in ("--config", str(p))]


def _exit_output(capsys, args: list[str]) -> str:
    """Runs the CLI with ``args``, expects a clean exit (help / print_config), returns what it printed."""
    with pytest.raises(SystemExit) as exc:
        train.main(args)
    out = capsys.readouterr()
    assert exc.value.code in (0, None), out.err[-2000:]
    return out.out


def test_every_phase_has_configs():
    assert (CONFIGS / "pretrain" / "tiny.yaml") in [s[-1] for s in CONFIG_SETS]
    assert (CONFIGS / "tune" / "tiny.yaml") in [s[-1] for s in CONFIG_SETS]
    # Every tune overlay found its base (an overlay alone lacks model.class_path and data).
    for paths in CONFIG_SETS:
        if paths[-1].parent.name == "tune" and len(paths) == 1:
            assert "class_path" in paths[0].read_text(), f"{paths[0]} is neither a full config nor an overlay"


@pytest.mark.parametrize(
    "paths", CONFIG_SETS, ids=["+".join(f"{p.parent.name}/{p.name}" for p in s) for s in CONFIG_SETS]
)
def test_config_parses(paths, capsys):
    printed = yaml.safe_load(_exit_output(capsys, ["fit", *_cli_args(paths), "--print_config"]))
    model, data = printed["model"], printed["data"]
    assert model["class_path"] in ("lightning_modules.EncoderPretraining", "lightning_modules.ConceptTuning")
    assert data["class_path"].startswith("datamodules.")
    phase = paths[0].parent.name
    if phase == "pretrain":
        assert model["class_path"] == "lightning_modules.EncoderPretraining"
    elif phase == "tune":
        assert model["class_path"] == "lightning_modules.ConceptTuning"
        assert data["init_args"]["steps"] >= 1


def test_tiny_pretrain_config_instantiates(tiny_sd_dir, tmp_path):
    from datamodules import PretrainDataModule
    from lightning_modules import EncoderPretraining

    cli = train.main(
        [
            "--config",
            str(CONFIGS / "pretrain" / "tiny.yaml"),
            "--model.init_args.pretrained_model_name_or_path",
            str(tiny_sd_dir),
            "--model.init_args.image_encoder_name_or_path",
            str(tiny_sd_dir),
            "--model.init_args.token_index_cache",
            str(tmp_path / "index"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path),
        ],
        run=False,
    )
    assert isinstance(cli.model, EncoderPretraining)
    assert isinstance(cli.datamodule, PretrainDataModule)
    # The placeholder reaches the data through parser.link_arguments, not a copied value.
    assert cli.datamodule.hparams.placeholder == cli.model.backbone.placeholder == "<s*>"
    assert cli.trainer.max_steps == 60
    # Only the personalizer is trainable; the frozen backbone has no trainable parameter.
    trainable = {n for n, p in cli.model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("personalizer.") for n in trainable)
    optimizer = cli.model.configure_optimizers()
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == pytest.approx(3e-4)


def test_fit_help_lists_the_cli(capsys):
    out = _exit_output(capsys, ["fit", "--help"])
    for option in ("--model", "--data", "--trainer.max_steps", "--ckpt_path", "--print_config"):
        assert option in out


@pytest.mark.parametrize(
    ("class_path", "option", "text"),
    [
        ("lightning_modules.EncoderPretraining", "--model.alpha", "dual-path blend"),
        ("lightning_modules.EncoderPretraining", "--model.nn_weight", "nearest-neighbour contrastive"),
        ("lightning_modules.ConceptTuning", "--model.tune", "what is optimised"),
        ("lightning_modules.ConceptTuning", "--model.encoder_checkpoint", "pretraining checkpoint"),
    ],
)
def test_model_help_documents_every_argument(capsys, class_path, option, text):
    out = " ".join(_exit_output(capsys, ["fit", "--model.help", class_path]).split())
    assert option in out
    assert text in out


def test_data_help_documents_every_argument(capsys):
    out = " ".join(_exit_output(capsys, ["fit", "--data.help", "datamodules.PretrainDataModule"]).split())
    assert "--data.roots" in out
    assert "Image folders" in out


@pytest.mark.parametrize("base", ["tiny", "sd15", "sd21"])
def test_no_regularizer_ablation_pretrains_its_own_encoder(base):
    """The ablation removes the regulariser from pretraining too: same recipe, nn_weight 0, own output folder,
    and the tuning ablation (and DreamBench's method entry) starts from that encoder."""
    full = yaml.safe_load((CONFIGS / "pretrain" / f"{base}.yaml").read_text())
    ablation = yaml.safe_load((CONFIGS / "pretrain" / f"{base}_no_regularizer.yaml").read_text())
    assert full["model"]["init_args"]["nn_weight"] > 0 and ablation["model"]["init_args"]["nn_weight"] == 0
    out = f"outputs/pretrain_{base}_no_regularizer"
    renamed = yaml.safe_load(
        (CONFIGS / "pretrain" / f"{base}.yaml").read_text().replace(f"outputs/pretrain_{base}", out)
    )
    renamed["model"]["init_args"]["nn_weight"] = 0.0
    assert renamed == ablation
    (checkpoint,) = [
        c for c in ablation["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    ]
    tune = yaml.safe_load((CONFIGS / "tune" / f"{base}_no_regularizer.yaml").read_text())["model"][
        "init_args"
    ]
    assert tune["encoder_checkpoint"] == f"{checkpoint['init_args']['dirpath']}/last.ckpt"
    assert tune["nn_weight"] == 0
    if base == "sd15":
        methods = yaml.safe_load((CONFIGS / "evaluate" / "sd15_dreambench.yaml").read_text())["methods"]
        (entry,) = [m for m in methods if m["name"] == "no_regularizer"]
        assert entry["overrides"]["model.init_args.encoder_checkpoint"] == tune["encoder_checkpoint"]
