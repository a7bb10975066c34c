"""The report's aggregation (evaluation/report/aggregate.py): bootstrap intervals over concepts, concepts weighing
the same, and the paired differences against a reference method."""

from __future__ import annotations

import pytest

from evaluation.report.aggregate import aggregate, bootstrap_ci, format_paired_table, paired_differences


def test_bootstrap_and_aggregate_over_concepts():
    assert bootstrap_ci([0.5]) == (0.5, 0.5)
    low, high = bootstrap_ci([0.1, 0.2, 0.3, 0.4], n_boot=500, seed=0)
    assert 0.1 <= low < 0.25 < high <= 0.4 and (low, high) == bootstrap_ci([0.1, 0.2, 0.3, 0.4], 500, 0)
    rows = [
        {"method": "m", "steps": 0, "alpha": 1.0, "guidance": 1.0, "concept": c, "clip_i": v, "clip_t": v}
        for c, vals in (("a", [0.0, 1.0, 1.0]), ("b", [0.0])) for v in vals
    ]  # fmt: skip
    (agg,) = aggregate(rows)
    assert agg["clip_i"]["mean"] == pytest.approx((2 / 3 + 0.0) / 2)  # concepts weigh the same
    assert agg["dino"] is None and agg["n_concepts"] == 2 and agg["n_images"] == 4


def test_paired_differences_pair_each_concept_with_the_reference():
    def row(method, concept, value, steps=0, alpha=1.0):
        return {
            "method": method,
            "steps": steps,
            "alpha": alpha,
            "guidance": 3.0,
            "concept": concept,
            "clip_i": value,
            "clip_t": None,
        }

    # concept "c" is hard for both methods: unpaired intervals overlap, the paired difference is clearly > 0
    rows = [
        row("words", "a", 0.50), row("words", "b", 0.60), row("words", "c", 0.10),
        row("date", "a", 0.55), row("date", "a", 0.57), row("date", "b", 0.64), row("date", "c", 0.13),
        row("date", "a", 0.40, steps=4), row("date", "b", 0.50, steps=4), row("date", "c", 0.30, steps=4),
        row("date", "z", 0.90, steps=4),  # no words row for "z": left out of the pairs
    ]  # fmt: skip
    first, second = paired_differences(rows, "words", n_boot=500)
    assert (first["setting"], second["setting"], first["reference_setting"]) == (
        "s0_a1_g3",
        "s4_a1_g3",
        "s0_a1_g3",
    )
    assert first["clip_i"]["mean"] == pytest.approx((0.06 + 0.04 + 0.03) / 3)
    assert first["clip_i"]["wins"] == 3 and first["clip_i"]["n"] == 3 and first["clip_i"]["ci95"][0] > 0
    assert (
        second["clip_i"]["mean"] == pytest.approx((-0.10 - 0.10 + 0.20) / 3) and second["clip_i"]["wins"] == 1
    )
    assert second["n_concepts"] == 3 and first["clip_t"] is None
    table = format_paired_table([first, second], columns=["clip_i"])
    assert "+0.043 [" in table and "(3/3)" in table and "against words (s0_a1_g3)" in table
    assert paired_differences(rows, "textual_inversion") == []
