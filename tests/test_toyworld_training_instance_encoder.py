"""The instance world's image encoder: its batches hold pairs of training-distribution instances in two
contexts, ``world: instance`` trains it, and the committed one clears the instance-probe values the docs state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from toyworld.instance.pairs import instance_pair_batch
from toyworld.instance.world import TRAIN_CATEGORIES, instance_split

COMMITTED = Path("assets/toyworld/instance_image_encoder")


def test_batches_pair_each_training_instance_in_two_contexts_with_hard_negatives():
    batch = instance_pair_batch(24, seed=0, step=3, group=4)
    ids, insts, px = batch["object_ids"], batch["instances"], batch["pixels"]
    assert px.shape == (48, 3, 32, 32) and ids.tolist() == [i for i in range(24) for _ in range(2)]
    assert all(insts[2 * i] == insts[2 * i + 1] for i in range(24))  # the two views of one instance
    assert all(not torch.equal(px[2 * i], px[2 * i + 1]) for i in range(24))  # in two contexts
    assert len(set(insts)) == 24  # every other instance is a negative
    # never a test / validation cell nor a held-out category
    assert {instance_split(i) for i in insts} == {"train"}
    cats = batch["labels"]["category"].tolist()
    assert cats == [TRAIN_CATEGORIES.index(i.category) for i in insts]
    assert cats[0] == cats[2] == cats[4]  # a group: instances of one category (hard negatives)
    again = instance_pair_batch(24, seed=0, step=3, group=4)
    assert torch.equal(px, again["pixels"]) and not torch.equal(px, instance_pair_batch(24, 0, 4)["pixels"])


def test_many_batches_stay_in_the_training_distribution():
    for step in range(20):
        insts = instance_pair_batch(32, seed=1, step=step)["instances"]
        assert {instance_split(i) for i in insts} == {"train"}


def test_world_instance_trains_an_encoder_with_a_category_read_out(tmp_path):
    from transformers import AutoModel

    from toyworld.training.image_encoder import train

    cfg = {
        "seed": 0, "world": "instance", "arch": "resnet", "image_size": 32, "out_dir": str(tmp_path),
        "steps": 2, "n_objects": 8, "group": 4, "lr": 1e-3, "temperature": 0.1, "projection_dim": 8,
        "image_weight": 1.0, "word_weight": 1.0,
        "resnet": {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1], "layer_type": "basic"},
    }  # fmt: skip
    dest = train(cfg)
    assert AutoModel.from_pretrained(dest).config.model_type == "resnet"
    heads = torch.load(tmp_path / "heads.pt", weights_only=True)
    assert set(heads["words"]) == {"category.weight", "category.bias"}
    assert heads["words"]["category.weight"].shape == (len(TRAIN_CATEGORIES), 16)
    with pytest.raises(ValueError, match="world must be"):
        train({**cfg, "world": "instances"})
    # head_features: stages puts both heads on the mean-pooled stages concatenated, the features DATE reads
    train({**cfg, "head_features": "stages", "out_dir": str(tmp_path / "stages")})
    heads = torch.load(tmp_path / "stages" / "heads.pt", weights_only=True)
    assert heads["words"]["category.weight"].shape == (len(TRAIN_CATEGORIES), 8 + 16)
    assert heads["projection"]["weight"].shape == (8, 8 + 16)
    with pytest.raises(ValueError, match="head_features must be"):
        train({**cfg, "head_features": "all"})


def test_the_probe_can_choose_on_the_validation_cells():
    from toyworld.diagnostics.instance_probe import instance_sets

    sets = instance_sets(10, 8, 5, seed=0, cells="validation")
    assert {instance_split(i) for i in sets["cells"]["instances"]} == {"validation"}
    with pytest.raises(ValueError, match="cells must be"):
        instance_sets(10, 8, 5, cells="train")


def test_the_committed_instance_encoder_sees_more_of_the_instance_than_the_named_one():
    """About 3 s. On a small seeded probe (400 training instances, 120 held-out test-cell instances: 119
    distractors), the committed instance encoder keeps near the values its probe JSON states and beats the
    named-world encoder."""
    from toyworld.diagnostics.instance_probe import instance_probe

    stated = json.loads((COMMITTED / "probe.json").read_text())["rows"][0]["cells"]
    result = instance_probe([str(COMMITTED), "assets/toyworld/image_encoder"], 400, 120, 30, seed=1)
    ours, named = (row["cells"] for row in result["rows"])
    assert ours["distractors"] == 119
    for column in ("hue", "category", "1nn"):
        assert ours[column] >= stated[column] - 0.1, (column, ours[column], stated[column])
    assert ours["1nn"] >= named["1nn"] + 0.1 and ours["category"] > named["category"]
