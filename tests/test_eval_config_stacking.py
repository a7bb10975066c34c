"""Stacked evaluation configs: a study overlay's ``methods`` list and the base's (jsonargparse merges equal-length
lists item by item; ``evaluate.py run`` refuses a method that would inherit fields that way)."""

from __future__ import annotations

import pytest
import yaml

import evaluate
from evaluation.config import EvaluationConfigError, MethodSpec


def _stack(tmp_path, later: list[dict]) -> list[str]:
    methods = [{"name": "words", "plain_words": True}, {"name": "enc", "overlay": "o.yaml", "steps": [0]}]
    base = {"out_dir": str(tmp_path / "out"), "methods": methods}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "later.yaml").write_text(yaml.safe_dump({"methods": later}))
    return ["run", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "later.yaml")]


def test_a_stacked_methods_list_of_the_same_length_is_merged_by_position(tmp_path, capsys):
    """The premise of the guard below, measured on jsonargparse: an equal-length list inherits the earlier items'
    fields; a list of another length replaces the earlier one."""
    from jsonargparse import CLI

    def run(out_dir: str = "x", methods: list[MethodSpec] | None = None) -> None:
        print(yaml.safe_dump([vars(m) for m in methods or []]))

    CLI({"run": run}, args=_stack(tmp_path, [{"name": "a"}, {"name": "b"}]))
    merged = yaml.safe_load(capsys.readouterr().out)
    assert merged[0]["plain_words"] is True and merged[1]["overlay"] == "o.yaml"
    CLI({"run": run}, args=_stack(tmp_path, [{"name": "a"}]))
    assert yaml.safe_load(capsys.readouterr().out)[0]["plain_words"] is False


def test_a_method_inheriting_fields_from_an_earlier_config_is_refused(tmp_path):
    from evaluation.config import check_stacked_methods

    with pytest.raises(EvaluationConfigError) as err:
        check_stacked_methods(_stack(tmp_path, [{"name": "a", "overrides": {"x": 1}}, {"name": "b"}]))
    assert str(err.value) == (
        f"{tmp_path / 'later.yaml'}: methods[0] (a) would inherit plain_words from methods[0] (words) of "
        f"{tmp_path / 'base.yaml'} (a methods list of the same length is merged item by item): set it in "
        f"{tmp_path / 'later.yaml'}"
    )
    with pytest.raises(EvaluationConfigError, match=r"methods\[1\] \(b\) would inherit overlay, steps from"):
        check_stacked_methods(_stack(tmp_path, [{"name": "a", "plain_words": False}, {"name": "b"}]))
    explicit = [{"name": "a", "plain_words": False}, {"name": "b", "overlay": None, "steps": [12]}]
    check_stacked_methods(_stack(tmp_path, explicit))  # every inherited field set: accepted
    check_stacked_methods(_stack(tmp_path, [{"name": "a"}]))  # another length: replaced, nothing inherited
    with pytest.raises(SystemExit) as exit_info:  # the command line refuses it before any work, in one line
        evaluate.main(_stack(tmp_path, [{"name": "a"}, {"name": "b", "steps": [1]}]))
    assert exit_info.value.code == 2


def _overrides_stack(tmp_path, base: dict, later: dict) -> list[str]:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({"tune_overrides": base}))
    (tmp_path / "later.yaml").write_text(yaml.safe_dump({"tune_overrides": later}))
    return ["run", "--config", str(tmp_path / "base.yaml"), "--config", str(tmp_path / "later.yaml")]


def test_a_stacked_tune_overrides_mapping_replaces_the_earlier_one(tmp_path, capsys):
    """The premise of the note below, measured on jsonargparse: a mapping given again is replaced, not merged."""
    from typing import Any

    from jsonargparse import CLI

    def run(out_dir: str = "x", tune_overrides: dict[str, Any] | None = None) -> None:
        print(yaml.safe_dump(tune_overrides))

    CLI({"run": run}, args=_overrides_stack(tmp_path, {"a": 1, "b": 2}, {"b": 5, "c": 3}))
    assert yaml.safe_load(capsys.readouterr().out) == {"b": 5, "c": 3}


def test_keys_a_stacked_tune_overrides_drops_are_named(tmp_path):
    from evaluation.config import replaced_tune_overrides

    argv = _overrides_stack(
        tmp_path, {"x.encoder": "e", "x.dtype": "f32", "x.lr": 1}, {"x.dtype": "f32", "x.b": 2}
    )
    assert replaced_tune_overrides(argv) == [
        f"{tmp_path / 'later.yaml'}: its tune_overrides replace those of {tmp_path / 'base.yaml'} (a mapping given "
        "again is not merged): x.encoder, x.lr fall back to the tune config's values"
    ]
    repeated = _overrides_stack(tmp_path, {"x.encoder": "e"}, {"x.encoder": "e", "x.b": 2})
    assert replaced_tune_overrides(repeated) == []  # every earlier key repeated: nothing falls back


def test_evaluate_names_the_dropped_keys_before_any_work(tmp_path, capsys):
    argv = _overrides_stack(
        tmp_path, {"model.init_args.encoder_checkpoint": "e.ckpt"}, {"model.init_args.alpha": 1}
    )
    with pytest.raises(SystemExit):
        evaluate.main(
            [*argv, "--out_dir", str(tmp_path / "out"), "--tune_config", str(tmp_path / "missing.yaml")]
        )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith(
        f"evaluate.py: note: {tmp_path / 'later.yaml'}: its tune_overrides replace those of"
    )
    assert err[0].endswith("model.init_args.encoder_checkpoint fall back to the tune config's values")
    assert not (tmp_path / "out").exists()
