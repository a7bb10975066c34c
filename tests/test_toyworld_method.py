"""The method's effect on the committed toy world, guarded in CI (seeded; numbers measured with the same run).

Measured (README "Results"): from ONE image of a novel shape (a red heart), 12-step DATE with the committed encoder
transfers the concept's colour and pattern into new contexts and keeps the prompt, and its v* is nearest to the
concept's own colour word, but it does not reproduce the novel shape: the paper's identity claim does not hold
here (the tiny CLIP image branch barely sees shape). The claim is kept below as a strict xfail, so the day it
starts to hold CI says so and the README must be updated.
"""

from __future__ import annotations

import json

import pytest

import evaluate
from evaluation.store.results import read_results

CONCEPT = "red_plain_heart"
WORDS = {"red", "plain", "heart"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_method") / "eval"
    methods = [
        {"name": "date", "steps": [12], "alphas": [0.5]},
        {"name": "plain_words", "plain_words": True},
    ]
    evaluate.main(
        [
            "run",
            "--config",
            "configs/evaluate/toyworld.yaml",
            "--out_dir",
            str(out),
            "--methods",
            json.dumps(methods),
            "--concepts.names",
            json.dumps([CONCEPT]),
            "--grids",
            "false",
            "--bootstrap_samples",
            "50",
            "--progress",
            "false",
        ]
    )
    return read_results(out / "results.csv")


def _mean(rows, method: str, column: str) -> float:
    values = [r[column] for r in rows if r["method"] == method]
    assert len(values) == 12  # 6 prompts x 2 samples
    return sum(values) / len(values)


@pytest.mark.slow
def test_date_transfers_colour_and_pattern_from_one_image_and_keeps_the_prompt(rows):
    # Measured: colour 1.00, pattern 1.00, prompt 1.00 (quick run of 3 prompts x 2 samples; this run 6 x 2).
    assert _mean(rows, "date", "colour_acc") >= 0.75
    assert _mean(rows, "date", "pattern_acc") >= 0.75
    assert _mean(rows, "date", "prompt_acc") >= 0.75
    nearest = {r["nearest_word"] for r in rows if r["method"] == "date"}
    assert nearest and nearest <= WORDS, nearest  # the regulariser's semantic word: "red"


@pytest.mark.slow
@pytest.mark.xfail(
    strict=True, reason="measured: DATE-12 identity 0.00 = plain words 0.00 on the novel heart"
)
def test_date_beats_the_plain_words_on_identity(rows):
    assert _mean(rows, "date", "identity_acc") >= _mean(rows, "plain_words", "identity_acc") + 0.25
