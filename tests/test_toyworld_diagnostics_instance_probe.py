"""The image-branch gate on the instance world (toyworld/diagnostics/instance_probe.py): held-out sets that
are held out, read-outs that can reach the gate, a pixel floor that sees hue, and the stated retrieval gallery."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from toyworld.diagnostics import instance_probe as P
from toyworld.instance.world import CATEGORIES, HELD_OUT_CATEGORIES, PATTERN_KINDS, instance_split

WIDTHS = {"hue": 2, "rotation": 2, "angle": 2}


def oracle(instances) -> torch.Tensor:
    """Features that hold every target (0 where undefined) and one-hots of pattern, category and points."""
    rows = []
    for inst in instances:
        v: list[float] = []
        for d in P.CONTINUOUS:
            t = P.target(inst, d)
            v += t if t is not None else [0.0] * WIDTHS.get(d, 1)
        v += list(np.eye(len(PATTERN_KINDS))[PATTERN_KINDS.index(inst.pattern)])
        v += list(np.eye(len(CATEGORIES))[CATEGORIES.index(inst.category)])
        v += list(np.eye(4)[inst.points - 4]) if inst.category == "star" else [0.0] * 4
        rows.append(v)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.fixture(scope="module")
def sets():
    return P.instance_sets(200, 40, 30, seed=0)


def test_sets_are_held_out_deterministic_and_seen_in_two_contexts(sets):
    assert {instance_split(i) for i in sets["train"]["instances"]} == {"train"}
    # held-out cells: the test cells of the training categories
    assert {instance_split(i) for i in sets["cells"]["instances"]} == {"test"}
    assert {i.category for i in sets["categories"]["instances"]} == set(HELD_OUT_CATEGORIES)
    for key in ("cells", "categories"):
        a, b = sets[key]["pixels"], sets[key]["pixels_b"]
        assert a.shape == b.shape == (len(sets[key]["instances"]), 3, 32, 32)
        assert all(not torch.equal(x, y) for x, y in zip(a, b))  # two different contexts
    again = P.instance_sets(200, 40, 30, seed=0)
    assert all(torch.equal(sets[k]["pixels"], again[k]["pixels"]) for k in sets)


def test_the_read_outs_reach_the_gate_on_features_that_hold_the_details(sets):
    feats = {k: oracle(s["instances"]) for k, s in sets.items()}
    feats |= {f"{k}_b": feats[k] for k in ("cells", "categories")}
    out = P.probe_features(feats, sets)
    assert all(v >= 0.99 for v in out["cells"].values() if isinstance(v, float))
    assert out["categories"]["category"] is None and out["categories"]["points"] is None
    assert out["categories"]["hue"] >= 0.99 and out["categories"]["1nn"] == 1.0


def test_pixels_see_hue_and_the_gallery_has_the_stated_distractors(sets):
    feats = {k: s["pixels"].flatten(1).double() for k, s in sets.items()}
    feats |= {f"{k}_b": sets[k]["pixels_b"].flatten(1).double() for k in ("cells", "categories")}
    out = P.probe_features(feats, sets)
    for key, n in (("cells", 40), ("categories", 30)):
        row = out[key]
        assert row["n"] == n and row["distractors"] == n - 1
        for c in P.COLUMNS:
            assert row[c] is None or (row[c] <= 1.0 and (c in P.CONTINUOUS or row[c] >= 0.0))
    assert out["cells"]["hue"] > 0.4  # chance is 0: a linear read of the pixels sees the object's hue
    # retrieval: row i must find row i among every row of the gallery (n - 1 distractors)
    z = torch.eye(5, dtype=torch.float64)
    assert P.retrieval(z, z) == 1.0 and P.retrieval(z, z.roll(1, 0)) == 0.0


def test_cli_prints_the_table_and_writes_json(tmp_path, capsys):
    from toyworld.__main__ import main

    out = tmp_path / "probe.json"
    args = ["instance-probe", "--encoder", "--n-train", "40", "--n-test", "12", "--n-categories", "9"]
    main(args)
    first = capsys.readouterr().out
    main([*args, "--out", str(out)])
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert text == first  # seeded: the same table twice
    assert "1-NN among 11 distractors" in text and "| raw pixels (32 x 32 x 3) |" in text
    assert [r["option"] for r in result["rows"]] == ["pixels"]
    assert result["rows"][0]["cells"]["distractors"] == 11
    with pytest.raises(SystemExit):
        main(["instance-probe", "--n-test", "2"])


def test_the_committed_towers_are_read_as_date_reads_them(sets):
    px = sets["cells"]["pixels"][:3]
    for folder, desc, width in (
        ("assets/toyworld/image_encoder", "mean of layers 1, 2, 3", 32 + 64 + 128),  # ResNet stages
        ("assets/toyworld/clip", "cls of layers 2, 4", 2 * 64),  # the first encoders' [CLS] tokens
    ):
        read, text = P.feature_reader(folder)
        assert text.endswith(desc) and read(px).shape == (3, width)


@pytest.mark.slow
def test_committed_hybrid_encoder_passes_retrieval_and_the_attainable_details():
    """The instance gate on the test cells, for the image encoder DATE pretrains with
    (assets/toyworld/instance_image_encoder_hybrid, fp16 weights): same-instance 1-NN across contexts among 299
    distractors >= 0.9, and >= 0.9 on the details the supervised oracle itself reaches 0.9 on, but for a star's
    points (0.88; the oracle 0.95). Measured (probe.json next to the weights, float32): 1-NN 0.92; hue 0.96,
    saturation 0.91, tilt 0.93, pattern 0.91, category 0.96. Roundness, pattern angle and period stay far below
    even supervised (docs/research/instance_image_encoder.md): not asserted."""
    row = P.instance_probe(["assets/toyworld/instance_image_encoder_hybrid"])["rows"][0]["cells"]
    assert row["1nn"] >= 0.9, row
    for detail in ("hue", "saturation", "tilt", "pattern", "category"):
        assert row[detail] >= 0.9, (detail, row)
    assert row["points"] >= 0.85, row
