"""``python -m toyworld instance-score-samples``: identity from pixels per row of an ``evaluate.py sample`` grid."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from evaluation.generate.images import save_grid
from toyworld.diagnostics.sample_rows import grid_images, load_png, score_rows

CONCEPTS = "assets/toyworld/instance_concepts"


def _grid(tmp_path, rows: list[np.ndarray], labels: list[str], scale: int = 3):
    path = tmp_path / "samples.png"
    cols = 3
    save_grid(np.stack([im for im in rows for _ in range(cols)]), str(path), cols=cols, scale=scale)
    path.with_suffix(".txt").write_text("".join(f"row {i + 1}: {t}\n" for i, t in enumerate(labels)))
    return path


def test_rows_are_cut_back_exactly_and_scored_against_the_input(tmp_path):
    own = load_png(f"{CONCEPTS}/cross_test2.png")
    other = load_png(f"{CONCEPTS}/star_test0.png")
    path = _grid(tmp_path, [own, other], ["a <s*>", "a cross (the words alone, no concept, same seeds)"])
    cut = grid_images(load_png(path), rows=2, scale=3)
    assert len(cut) == 2 and all(len(r) == 3 for r in cut)
    assert (cut[0][2] == own).all() and (cut[1][0] == other).all()
    scores = score_rows(path, own)
    assert [r["words"] for r in scores] == [False, True]
    assert scores[0]["same_instance"] == 3 and scores[0]["mean"] > 0.9  # the input against itself
    assert scores[1]["same_instance"] == 0 and scores[1]["mean"] < 0.3  # a red star against a blue cross


def test_a_grid_of_another_layout_is_refused(tmp_path):
    own = load_png(f"{CONCEPTS}/cross_test2.png")
    path = _grid(tmp_path, [own], ["a <s*>"], scale=2)
    with pytest.raises(ValueError, match="not 1 rows of square images at scale 3"):
        score_rows(path, own, scale=3)


def test_the_command_prints_a_table_and_names_a_missing_grid(tmp_path):
    own = load_png(f"{CONCEPTS}/cross_test2.png")
    path = _grid(tmp_path, [own, own], ["a <s*>", "a cross (the words alone, no concept, same seeds)"])
    cmd = [sys.executable, "-m", "toyworld", "instance-score-samples", "--concept", "cross_test2"]
    done = subprocess.run([*cmd, "--grid", str(path)], capture_output=True, text=True, check=True)
    assert "| a <s*> | 1.00 1.00 1.00 | 1.000 | 3/3 |" in done.stdout, done.stdout
    assert "concept rows 1.000, the words' rows 1.000" in done.stdout
    bad = subprocess.run([*cmd, "--grid", str(tmp_path / "none.png")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        f"--grid {tmp_path / 'none.png'} does not exist"
    )
