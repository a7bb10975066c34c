"""The named world's validation concepts: the 8 base-distribution objects and the novel-shape ones that make the
validation set look like the test set (held-out shapes in looks no test concept has)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evaluation.config import EvaluationConfigError
from toyworld.named.concepts import ToyWorldConcepts
from toyworld.named.validation import (
    novel_validation_concepts,
    validation_concepts,
    write_validation_concepts,
)
from toyworld.named.world import HELD_OUT_CONCEPTS, HELD_OUT_SHAPES, TRAIN_SHAPES

COMMITTED = Path("assets/toyworld/validation_concepts")
COMMITTED_NOVEL = Path("assets/toyworld/validation_concepts_novel")


def test_novel_validation_concepts_are_held_out_shapes_in_new_looks():
    novel = novel_validation_concepts(4)
    assert len(set(novel)) == 4
    assert {o[0] for o in novel} == set(HELD_OUT_SHAPES)  # both shapes the base never saw
    assert not set(novel) & set(HELD_OUT_CONCEPTS)  # no test concept's look
    assert novel == novel_validation_concepts(4)  # seeded
    assert all(o[0] in TRAIN_SHAPES for o in validation_concepts(8))


def test_written_folder_loads_with_its_kinds(tmp_path):
    folder = Path(write_validation_concepts(str(tmp_path / "v"), n=8, novel=4))
    entries = json.loads((folder / "concepts.json").read_text())
    kinds = [e["kind"] for e in entries]
    assert kinds == ["validation"] * 8 + ["validation_novel_shape"] * 4
    assert [e["class_noun"] for e in entries[8:]] == ["object"] * 4  # as the test's novel shapes
    concepts = ToyWorldConcepts(str(folder), num_prompts=3, seed=1, num_references=2).load("<s*>")
    assert [c.kind for c in concepts] == kinds
    # the first 8 are the committed base-distribution set, byte for byte
    assert entries[:8] == json.loads((COMMITTED / "concepts.json").read_text())
    for e in entries[:8]:
        assert (folder / e["image"]).read_bytes() == (COMMITTED / e["image"]).read_bytes()


def test_committed_novel_folder_is_what_the_command_writes(tmp_path):
    folder = Path(write_validation_concepts(str(tmp_path / "v"), novel=4))
    assert (folder / "concepts.json").read_text() == (COMMITTED_NOVEL / "concepts.json").read_text()
    for e in json.loads((folder / "concepts.json").read_text()):
        assert (folder / e["image"]).read_bytes() == (COMMITTED_NOVEL / e["image"]).read_bytes()


@pytest.mark.parametrize(
    ("name", "shape", "colour", "pattern", "match"),
    [
        ("red_plain_heart", "heart", "red", "plain", "a look no test concept has"),  # a test concept
        ("red_plain_star", "star", "red", "plain", "a held-out shape"),  # not a novel shape
    ],
)
def test_novel_validation_kind_refuses_test_looks_and_seen_shapes(
    tmp_path, name, shape, colour, pattern, match
):
    folder = Path(write_validation_concepts(str(tmp_path / "v"), n=1, novel=1))
    entries = json.loads((folder / "concepts.json").read_text())
    bad = dict(entries[1], name=name, image=entries[1]["image"])
    bad["attributes"] = dict(bad["attributes"], shape=shape, colour=colour, pattern=pattern)
    (folder / "concepts.json").write_text(json.dumps([entries[0], bad]))
    with pytest.raises(EvaluationConfigError, match=match):
        ToyWorldConcepts(str(folder), num_references=2).load("<s*>")
