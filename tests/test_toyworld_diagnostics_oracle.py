"""The supervised oracle (a diagnostic of the instance gate, toyworld/diagnostics/oracle.py): a few steps train,
save an image-encoder folder the gate reads, and the gate returns finite values; ``--image-size`` reaches the
saved folder, the gate reads at that size, and a size below the 32 px renders is refused."""

from __future__ import annotations

import json
import math

import pytest
import torch

from toyworld.diagnostics.instance_probe import COLUMNS, instance_probe


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


def test_oracle_image_size_reaches_the_saved_folder_and_the_gate_reads_at_it(tmp_path, capsys):
    from transformers import AutoModel

    from models.encoder import image_tokens
    from toyworld.__main__ import main
    from toyworld.diagnostics.instance_probe import feature_reader
    from toyworld.training.image_encoder import tower_pixels

    main(["instance-oracle", "--steps", "2", "--image-size", "48", "--out-dir", str(tmp_path)])
    dest = tmp_path / "image_encoder"
    assert capsys.readouterr().out.strip() == str(dest)
    assert json.loads((dest / "train.json").read_text())["image_size"] == 48
    assert json.loads((dest / "config.json").read_text())["image_size"] == 48
    processor = json.loads((dest / "preprocessor_config.json").read_text())
    assert processor["size"] == {"shortest_edge": 48}
    assert processor["crop_size"] == {"height": 48, "width": 48}
    # the gate's reader resizes the 32 px renders to the trained size, not to 64
    px = torch.rand(3, 3, 32, 32) * 2 - 1
    read, _ = feature_reader(str(dest))
    enc = AutoModel.from_pretrained(str(dest), dtype=torch.float32).eval()
    with torch.no_grad():
        states = enc(pixel_values=tower_pixels(px, 48), output_hidden_states=True).hidden_states
    expected = torch.cat([image_tokens(h, "mean") for h in states[1:]], dim=-1).double()
    assert torch.allclose(read(px), expected, atol=1e-6)


def test_oracle_refuses_an_image_size_below_the_renders(capsys):
    from toyworld.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["instance-oracle", "--image-size", "16"])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and "--image-size" in errors[0] and "16" in errors[0]


def test_hybrid_options_reach_the_training_and_its_record(tmp_path, capsys):
    """``--contrastive-weight`` adds SupCon over instances (a ``supcon`` loss in the record) on grouped batches."""
    from toyworld.__main__ import main

    argv = ["instance-oracle", "--steps", "2", "--out-dir", str(tmp_path), "--contrastive-weight", "0.5"]
    main([*argv, "--group", "4", "--one-detail", "1", "--temperature", "0.2"])
    info = json.loads((tmp_path / "image_encoder" / "train.json").read_text())
    assert (info["contrastive_weight"], info["group"], info["one_detail"], info["temperature"]) == (
        0.5,
        4,
        1.0,
        0.2,
    )
    assert math.isfinite(info["final_losses"]["supcon"])
    capsys.readouterr()
    main(["instance-oracle", "--steps", "1", "--out-dir", str(tmp_path / "plain")])
    assert (
        "supcon"
        not in json.loads((tmp_path / "plain" / "image_encoder" / "train.json").read_text())["final_losses"]
    )


@pytest.mark.parametrize(
    "flag, value",
    [("--contrastive-weight", "-1"), ("--group", "0"), ("--temperature", "0"), ("--one-detail", "1.5")],
)
def test_hybrid_options_refuse_bad_values(flag, value, capsys):
    from toyworld.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["instance-oracle", flag, value])
    assert exc.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and flag in errors[0]
