"""The supervised oracle (a diagnostic of the instance gate, toyworld/instance_oracle.py): a few steps train,
save an image-encoder folder the gate reads, and the gate returns finite values."""

from __future__ import annotations

import json
import math

from toyworld.instance_probe import COLUMNS, instance_probe


def test_oracle_trains_saves_and_the_gate_reads_it(tmp_path, capsys):
    from toyworld.__main__ import main

    main(["instance-oracle", "--steps", "3", "--out-dir", str(tmp_path)])
    dest = tmp_path / "image_encoder"
    assert capsys.readouterr().out.strip() == str(dest)
    info = json.loads((dest / "train.json").read_text())
    assert info["steps"] == 3 and info["image_size"] == 64
    assert all(math.isfinite(v) for v in info["final_losses"].values())
    result = instance_probe([str(dest)], n_train=60, n_test=16, n_categories=12, cells="validation")
    row = result["rows"][0]
    assert "mean of layers 1, 2, 3" in row["features"]  # the mean-pooled stages, as DATE reads the ResNet
    for key in ("cells", "categories"):
        values = [row[key][c] for c in COLUMNS if row[key][c] is not None]
        assert len(values) >= 10 and all(math.isfinite(v) for v in values)
