"""Every committed training config parses through the real CLI, and ``--help`` documents the options.

Configs for real Stable Diffusion weights name hub ids that are not available offline, so configs are only
PARSED here (``--print_config`` exits before anything is instantiated); the tiny configs are instantiated and
run by ``test_training.py``. An overlay (``configs/tune/methods/``, the studies' overlays in
``configs/experiments/``) is parsed stacked on every chain of configs its ``# stack on:`` header lines name, never
on a base guessed from its file name. ``configs/backbone``, ``configs/evaluate`` and the studies' evaluation
overlays are not ``train.py`` configs and are tested in ``test_evaluate.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def stack_chains(path: Path) -> list[tuple[Path, ...]]:
    """The configs an overlay is stacked on, from its ``# stack on: <config> [<config> ...]`` header lines: one line
    per chain (``--config`` order), one chain per base the overlay is meant for. Full configs have none."""
    root = CONFIGS.parent
    return [
        tuple(root / p for p in line.split(":", 1)[1].split())
        for line in path.read_text().splitlines()
        if line.startswith("# stack on:")
    ]


def is_full_config(path: Path) -> bool:
    """A config that builds on its own: it names its model's class."""
    model = (yaml.safe_load(path.read_text()) or {}).get("model") or {}
    return "class_path" in model


def train_configs() -> list[Path]:
    """Every ``train.py`` YAML: pretraining and tuning configs, method overlays, and the experiments' training
    overlays (those stacked on a pretrain or tune config; the others are ``evaluate.py`` overlays)."""
    paths = sorted((CONFIGS / "pretrain").glob("*.yaml")) + sorted((CONFIGS / "tune").rglob("*.yaml"))
    for path in sorted((CONFIGS / "experiments").rglob("*.yaml")):
        chains = stack_chains(path)
        if chains and chains[0][0].parent.name in ("pretrain", "tune"):
            paths.append(path)
    return paths


def _config_sets() -> list[tuple[Path, ...]]:
    sets: list[tuple[Path, ...]] = []
    for path in train_configs():
        chains = stack_chains(path)
        sets += [(*chain, path) for chain in chains] if chains else [(path,)]
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
    # An overlay alone lacks model.class_path and data: each one declares the configs it is stacked on, and a full
    # config declares none.
    for path in train_configs():
        chains = stack_chains(path)
        assert bool(chains) != is_full_config(path), (
            f"{path}: a full config, or an overlay with stack on lines"
        )
        for chain in chains:
            assert all(p.is_file() for p in chain), f"{path}: stacked on a missing config {chain}"
            assert is_full_config(chain[0]), f"{path}: its chain {chain} does not start at a full config"


@pytest.mark.parametrize(
    "paths", CONFIG_SETS, ids=["+".join(f"{p.parent.name}/{p.name}" for p in s) for s in CONFIG_SETS]
)
def test_config_parses(paths, capsys):
    printed = yaml.safe_load(_exit_output(capsys, ["fit", *_cli_args(paths), "--print_config"]))
    model, data = printed["model"], printed["data"]
    assert model["class_path"] in ("lightning_modules.EncoderPretraining", "lightning_modules.ConceptTuning")
    assert data["class_path"].startswith("datamodules.")
    phase = paths[0].parent.name  # the full config's folder
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


def _printed(capsys, paths: tuple[Path, ...]) -> dict:
    return yaml.safe_load(_exit_output(capsys, ["fit", *_cli_args(paths), "--print_config"]))


@pytest.mark.parametrize("base", ["tiny", "sd15", "sd21", "toyworld", "instance"])
def test_no_regularizer_ablation_pretrains_its_own_encoder(base, capsys):
    """The ablation removes the regulariser from pretraining too: the same recipe with nn_weight 0 and its own
    output folder (checkpoints and logs follow it), and the tuning ablation (and DreamBench's method entry) starts
    from that encoder."""
    study = CONFIGS / "experiments" / "no_regularizer"
    pretrain = CONFIGS / "pretrain" / f"{base}.yaml"
    full = _printed(capsys, (pretrain,))
    ablation = _printed(capsys, (pretrain, study / f"pretrain_{base}.yaml"))
    assert full["model"]["init_args"]["nn_weight"] > 0 and ablation["model"]["init_args"]["nn_weight"] == 0
    old, new = full["trainer"]["default_root_dir"], ablation["trainer"]["default_root_dir"]
    assert new == f"{old}_no_regularizer"
    renamed = yaml.safe_load(yaml.safe_dump(full).replace(old, new))
    renamed["model"]["init_args"]["nn_weight"] = 0.0
    assert renamed == ablation
    if base == "instance":  # evaluated by the study's own evaluation configs
        return
    (checkpoint,) = [
        c for c in ablation["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")
    ]
    tune = yaml.safe_load((study / f"tune_{base}.yaml").read_text())["model"]["init_args"]
    if base != "toyworld":  # the toy world tunes from the committed copy of that checkpoint
        assert tune["encoder_checkpoint"] == f"{checkpoint['init_args']['dirpath']}/last.ckpt"
    assert tune["nn_weight"] == 0
    if base == "sd15":
        methods = yaml.safe_load((CONFIGS / "evaluate" / "sd15_dreambench.yaml").read_text())["methods"]
        (entry,) = [m for m in methods if m["name"] == "no_regularizer"]
        assert entry["overrides"]["model.init_args.encoder_checkpoint"] == tune["encoder_checkpoint"]


def test_a_method_has_one_name_everywhere():
    """Two different recipes never share a name: every overlay that sets ``model.init_args.method`` sets one no
    other overlay sets with different tuned parameters, init or optimizer."""
    seen: dict[str, tuple[Path, dict]] = {}
    keys = ("tune", "init", "init_token", "instance_prompt", "nn_weight", "unet_lora_rank", "optimizer")
    for path in train_configs():
        init = ((yaml.safe_load(path.read_text()) or {}).get("model") or {}).get("init_args") or {}
        if is_full_config(path) or "method" not in init:
            continue
        recipe = {k: init.get(k) for k in keys}
        name = init["method"]
        if name in seen:
            assert seen[name][1] == recipe, f"{path} and {seen[name][0]} both record method {name!r}"
        seen.setdefault(name, (path, recipe))
    assert {"lora", "factored_lora", "textual_inversion", "textual_inversion_zero_init"} <= set(seen)


def test_the_quickstart_pretrains_into_its_own_folder():
    """Its 200-step pretraining must not overwrite the checkpoints of a full run of the same recipe (the recipe's
    resume line points at ``<default_root_dir>/checkpoints/last.ckpt``)."""
    script = Path("scripts/quickstart.sh").read_text().replace("\\\n", " ")
    runs = [line for line in script.splitlines() if "train.py fit" in line and "configs/pretrain/" in line]
    assert runs, "the quickstart runs no pretraining"
    for line in runs:
        configs = re.findall(r"--config (\S+)", line)
        recipe_dirs = {
            str(d)
            for c in configs
            if (d := (yaml.safe_load(Path(c).read_text()).get("trainer") or {}).get("default_root_dir"))
        }
        own = re.search(r"--trainer\.default_root_dir (\S+)", line)
        assert own and own.group(1) not in recipe_dirs, line
