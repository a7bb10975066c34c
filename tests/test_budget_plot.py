"""``evaluate.py plot --x tune_seconds``: identity against tuning time from a results.csv, no model loaded."""

from __future__ import annotations

import csv
import json

from PIL import Image

import evaluate
from evaluation.report.budget import plot_identity_vs_seconds
from evaluation.store.results import HEAD, TAIL


def _rows(path):
    head = [*HEAD, "clip_i", *TAIL]  # the results.csv schema with one metric column
    rows = []
    for c, concept in enumerate(["a", "b"]):
        budgets = [("plain_words", 0, "", 0.1 + c * 0.01)]
        budgets += [
            ("dreambooth", s, t, i) for s, t, i in [(12, 1.0, 0.2), (100, 10.0, 0.3), (500, 50.0, 0.35)]
        ]
        for method, steps, secs, ident in budgets:
            setting = f"s{steps}_a1_g3"
            rows.append(
                {"method": method, "setting": setting, "steps": steps, "alpha": 1.0, "guidance": 3.0}
                | {"concept": concept, "class_noun": "dog", "prompt_idx": 0, "prompt": "a <s*>", "sample": 0}
                | {"seed": 0, "image": f"images/{method}/{setting}/{concept}/00_00.png", "clip_i": ident}
                | {"tune_seconds": secs, "sampler": "ddim", "inference_steps": 25}
            )
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, head)
        w.writeheader()
        w.writerows(rows)
    return path


def test_identity_vs_seconds_is_drawn_from_results(tmp_path, capsys):
    results = _rows(tmp_path / "results.csv")
    out = evaluate.main(
        ["plot", "--results", str(results), "--x", "tune_seconds", "--y", "clip_i", "--ceiling", "0.7"]
    )
    assert out == tmp_path / "identity_vs_seconds.png"
    with Image.open(out) as img:
        assert img.size[0] > 500 and img.size[1] > 300
    assert "dreambooth" in capsys.readouterr().out


def test_identity_vs_seconds_needs_a_tuned_method(tmp_path):
    import pytest

    words_only = [
        {"method": "plain_words", "steps": 0, "alpha": 1.0, "guidance": 3.0, "clip_i": {"mean": 0.1}}
    ]
    with pytest.raises(ValueError, match="tuning seconds"):
        plot_identity_vs_seconds(words_only, tmp_path / "x.png", y="clip_i")


def test_methods_are_chosen_and_renamed_across_results_files(tmp_path, capsys):
    """Two runs' rows, one line per label: the runs' DreamBooth rows under one name, the words once."""
    import pytest

    first, second = tmp_path / "run_a", tmp_path / "run_b"
    first.mkdir(), second.mkdir()
    paths = [str(_rows(first / "results.csv")), str(_rows(second / "results.csv"))]
    labels = {
        "run_a/plain_words": "plain_words",
        "run_a/dreambooth": "DreamBooth",
        "run_b/dreambooth": "again",
    }
    argv = ["plot", "--results", json.dumps(paths), "--x", "tune_seconds", "--y", "clip_i"]
    evaluate.main([*argv, "--methods", json.dumps(labels), "--out", str(tmp_path / "x.png")])
    table = capsys.readouterr().out
    assert "DreamBooth" in table and "again" in table and "run_b/plain_words" not in table
    with pytest.raises(SystemExit) as exc:
        evaluate.main([*argv, "--methods", json.dumps({"run_c/date": "DATE"})])
    assert exc.value.code == 2 and "run_c/date" in capsys.readouterr().err


def test_a_method_is_drawn_at_the_setting_chosen_for_each_budget(tmp_path, capsys, monkeypatch):
    """``<method>@guidance=G,alpha=A`` keys take only those rows; rows chosen per budget make one line."""
    import pytest

    import evaluation.report.budget as budget

    results = tmp_path / "results.csv"
    _rows(results)
    rows = list(csv.DictReader(results.open()))
    for row in list(rows):  # the same run at guidance 2 with higher identity
        rows.append(
            {**row, "guidance": "2.0", "setting": row["setting"].replace("g3", "g2"), "clip_i": "0.9"}
        )
    with results.open("w", newline="") as f:
        w = csv.DictWriter(f, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    drawn = []
    real = budget.plot_identity_vs_seconds
    monkeypatch.setattr(
        evaluate, "plot_identity_vs_seconds", lambda a, *x, **k: drawn.append((a, k)) or real(a, *x, **k)
    )
    argv = [
        "plot",
        "--results",
        str(results),
        "--x",
        "tune_seconds",
        "--y",
        "clip_i",
        "--out",
        str(tmp_path / "x.png"),
    ]
    evaluate.main(
        [
            *argv,
            "--methods",
            json.dumps({"dreambooth@guidance=2,alpha=1": "DB", "plain_words@guidance=3": "plain_words"}),
        ]
    )
    aggregates, kwargs = drawn[-1]
    assert kwargs["line_per_method"] is True
    assert {(a["method"], a["guidance"]) for a in aggregates} == {("DB", 2.0), ("plain_words", 3.0)}
    assert all(a["clip_i"]["mean"] == pytest.approx(0.9) for a in aggregates if a["method"] == "DB")
    for key, message in [
        ("dreambooth@guidance=7", "dreambooth has no rows at guidance=7"),
        ("dreambooth@seed=0", "after '@' write guidance=, alpha= and / or steps=<number>"),
    ]:
        with pytest.raises(SystemExit) as exc:
            evaluate.main([*argv, "--methods", json.dumps({key: "DB"})])
        assert exc.value.code == 2 and message in capsys.readouterr().err
