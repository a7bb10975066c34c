"""DATE on the instance world, guarded in CI (seeded; the numbers are those of the test run in
docs/instance_results.md, with the committed instance encoder and the tuning defaults chosen on the validation
concepts). Concepts: the first held-out instance of each of the six training categories (``<category>_test0``,
the main kind), chosen by that rule before their results were read.

Measured: DATE-12 (lr 1e-2, alpha 1) keeps the prompt, but does NOT beat the words on identity on this world (the
predicted cores carry no identity; the capacity is in the LoRA factors, docs/instance_results.md). That claim of
the paper is kept as a strict xfail, so the day it starts to hold CI says so and the results must be updated.
DATE + factors-12 (alpha 0.5) does beat the words by a small paired margin over all 24 test concepts: that is a
real regression test (the setting with the largest <= 12-step gain on the validation concepts).
"""

from __future__ import annotations

import json

import pytest

import evaluate
from evaluation.store.results import read_results

CONCEPTS = [f"{c}_test0" for c in ("circle", "square", "triangle", "star", "diamond", "cross")]


def _evaluate(out, methods: list[dict], *args: str) -> None:
    """configs/evaluate/instance_date.yaml with ``methods`` (and more ``args``) into ``out``, no grids."""
    argv = ["run", "--config", "configs/evaluate/instance_date.yaml", "--out_dir", str(out)]
    evaluate.main([*argv, "--methods", json.dumps(methods), "--grids", "false", "--progress", "false", *args])


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("instance_method") / "eval"
    methods = [
        {"name": "date", "steps": [12], "alphas": [0.5, 1.0]},
        {"name": "plain_words", "plain_words": True},
    ]
    _evaluate(out, methods, "--concepts.names", json.dumps(CONCEPTS), "--bootstrap_samples", "50")
    return read_results(out / "results.csv")


def _mean(rows, method: str, column: str, alpha: float = 1.0) -> float:
    values = [r[column] for r in rows if r["method"] == method and abs(r["alpha"] - alpha) < 1e-6]
    assert len(values) == len(CONCEPTS) * 8  # 4 prompts x 2 samples
    return sum(values) / len(values)


@pytest.mark.slow
def test_alpha_trades_prompt_and_v_star_stays_near_its_category_word(rows):
    """Measured (test run): prompt accuracy 0.854 at alpha 0.5 against 0.625 at alpha 1; v* nearest to its own
    category word for cross, diamond and triangle (circle -> diamond, square -> triangle, star -> cross)."""
    assert _mean(rows, "date", "pixel_prompt_acc", alpha=0.5) >= 0.8
    assert _mean(rows, "date", "pixel_prompt_acc", alpha=0.5) >= _mean(rows, "date", "pixel_prompt_acc") + 0.1
    nearest = {(r["concept"], r["nearest_word"]) for r in rows if r["method"] == "date"}
    assert sum(word == concept.split("_")[0] for concept, word in nearest) >= 3, nearest


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="measured: DATE-12 identity 0.105 (alpha 1) vs the words 0.131")
def test_date_beats_the_plain_words_on_identity(rows):
    assert _mean(rows, "date", "pixel_identity") >= _mean(rows, "plain_words", "pixel_identity") + 0.03


def test_core_probe_finds_the_noise_draw_in_the_committed_encoders_cores(capsys):
    """The E4T-style encoder (its input is its target, read at the target's noise) lowers the loss with its own
    cores far below another same-category instance's (measured with n 64, draws 8: 0.202 vs 0.248): the cores
    carry the noise draw. One prediction at inference cannot: ``inference`` is no lower than
    ``inference_same_category`` (0.227 vs 0.226)."""
    from toyworld.core_probe import core_probe, main

    out = core_probe(
        "assets/toyworld/instance_encoder/date.ckpt", "configs/pretrain/instance.yaml", n=16, draws=2
    )
    assert out["own_timestep"] + 0.03 < out["own_timestep_same_category_cores"], out
    assert out["own_timestep"] < out["inference"] and out["n"] == 16
    with pytest.raises(SystemExit) as exc:
        main(["missing.ckpt"])
    assert exc.value.code == 2 and "checkpoint missing.ckpt does not exist" in capsys.readouterr().err


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    """DATE + factors-12 (alpha 0.5) and the words on all 24 test concepts, paired in the run's report."""
    out = tmp_path_factory.mktemp("instance_factors") / "eval"
    methods = [
        {"name": "date_factors", "overrides": {"model.init_args.tune": ["embedding", "cores", "factors"]},
         "steps": [12], "alphas": [0.5]},
        {"name": "plain_words", "plain_words": True},
    ]  # fmt: skip
    _evaluate(out, methods, "--bootstrap_samples", "1000")
    summary = json.loads((out / "summary.json").read_text())
    assert (out / "paired.md").is_file()
    return summary["paired_vs_reference"]


@pytest.mark.slow
def test_date_with_factors_beats_the_plain_words_concept_by_concept(paired):
    """Measured (docs/instance_results.md, test run): identity - words +0.022 [+0.010, +0.034], 18 of 24 won."""
    (entry,) = paired
    assert (entry["method"], entry["steps"], entry["alpha"], entry["reference"]) == (
        "date_factors", 12, 0.5, "plain_words")  # fmt: skip
    identity = entry["pixel_identity"]
    assert identity["n"] == 24
    assert identity["mean"] >= 0.01 and identity["ci95"][0] > 0 and identity["wins"] >= 15, identity
