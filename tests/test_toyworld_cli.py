"""``python -m toyworld``: one command per function, grouped by room in ``--help``; every option documented; the
command names and dashed options that docs and scripts use keep working."""

from __future__ import annotations

import pytest

from toyworld.__main__ import ROOMS, main, parser

COMMANDS = {
    "sample-prompts", "render", "write-concepts", "write-validation-concepts", "validate-encoder",
    "base-adherence", "instance-render", "instance-concepts", "train", "export", "card", "probe",
    "export-instance", "export-encoder", "figures", "instance-adherence", "instance-ceiling",
    "probe-image-encoder", "instance-probe", "instance-oracle", "instance-calibrate", "core-probe",
    "instance-score-samples", "peft-reference",
}  # fmt: skip


def test_every_command_is_listed_under_its_room(capsys):
    assert {name for commands in ROOMS.values() for name in commands} == COMMANDS
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for room, commands in ROOMS.items():
        assert room in out
        assert all(f"  {name} " in out for name in commands)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_is_explained(command, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    sub = next(a for a in parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    for action in sub._actions:
        assert action.help and action.help.strip(), (command, action.dest)


def test_dashed_options_lists_and_repeated_configs_parse():
    p = parser()
    args = p.parse_args(["instance-probe", "--n-train", "7", "--encoder", "a", "b", "--cells", "validation"])
    assert (args.n_train, args.encoder, args.cells) == (7, ["a", "b"], "validation")
    args = p.parse_args(["train", "base", "--config", "x.yaml", "--config", "y.yaml"])
    assert (args.model, args.config) == ("base", ["x.yaml", "y.yaml"])
    args = p.parse_args(["probe-image-encoder", "--layers", "1", "2", "3"])
    assert args.layers == [1, 2, 3] and args.encoder == "assets/toyworld/image_encoder"
    args = p.parse_args(["export-encoder", "--ckpt", "c.ckpt", "--name", "date", "--fp16"])
    assert (args.ckpt, args.name, args.fp16, args.folder, args.log_dir) == (
        "c.ckpt",
        "date",
        True,
        "encoder",
        None,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sample-prompts", "--n", "0"], "--n must be >= 1, got 0"),
        (["train", "base", "--config", "nowhere.yaml"], "--config nowhere.yaml does not exist"),
        (["figures", "nowhere"], "nowhere holds no results.csv (an evaluate.py run's out_dir)"),
        (["instance-probe", "--n-test", "4"], "--n-test must be >= 5, got 4"),
    ],
)
def test_a_bad_value_is_one_error_line(argv, message, capsys):
    with pytest.raises(SystemExit) as err:
        main(argv)
    assert err.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"python -m toyworld: error: {message}"


def test_the_map_lists_every_module():
    """The package docstring and docs/architecture.md name every module of every room."""
    from pathlib import Path

    import toyworld

    root = Path(toyworld.__file__).parent
    architecture = (root.parent / "docs" / "architecture.md").read_text()
    modules = [p for p in root.rglob("*.py") if p.stem != "__init__"]
    missing = [
        str(p.relative_to(root))
        for p in modules
        if f"``{p.stem}``" not in toyworld.__doc__ or (p.parent != root and f"`{p.stem}`" not in architecture)
    ]
    assert not missing, missing
    assert all(
        f"`{room}/`" in architecture for room in ("common", "named", "instance", "training", "release")
    )
