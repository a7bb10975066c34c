"""DreamBench subjects, prompts and folder loader on a fake folder tree."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from evaluation.concepts.dreambench import (
    DEFAULT_PROMPTS_FILE,
    DEFAULT_SUBJECTS_FILE,
    PLACEHOLDER,
    fill_placeholder,
    load_dreambench,
    load_images,
    load_prompt_lists,
)

FAKE_SUBJECTS = {"dog6": 3, "backpack": 4, "bear_plushie": 2}


@pytest.fixture
def fake_root(tmp_path):
    root = tmp_path / "dreambench"
    for i, (name, count) in enumerate(FAKE_SUBJECTS.items()):
        (root / name).mkdir(parents=True)
        for j in range(count):
            color = (40 * i, 60 * j, 200)
            Image.new("RGB", (24 + 4 * j, 20), color).save(root / name / f"{j:02d}.jpg")
        (root / name / "notes.txt").write_text("not an image")
    return root


def test_shipped_subjects_and_prompts():
    data = json.loads(DEFAULT_SUBJECTS_FILE.read_text())
    subjects = {s["name"]: s for s in data["subjects"]}
    assert len(subjects) == 30
    assert sorted(n for n, s in subjects.items() if s["live"]) == [
        "cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"
    ]  # fmt: skip
    assert subjects["bear_plushie"]["class_noun"] == "stuffed animal"
    assert subjects["pink_sunglasses"]["class_noun"] == "glasses"
    assert subjects["backpack_dog"]["class_noun"] == "backpack"
    assert "Ruiz" in data["attribution"]["citation"] and "CC-BY-4.0" in data["attribution"]["license"]

    lists = load_prompt_lists()
    assert len(lists["object"]) == len(set(lists["object"])) == 25
    assert len(lists["live"]) == len(set(lists["live"])) == 25
    assert all(PLACEHOLDER in p for p in lists["object"] + lists["live"])
    assert (
        "a <s*> wearing a santa hat" in lists["live"] and "a <s*> wearing a santa hat" not in lists["object"]
    )
    assert "a <s*> floating in an ocean of milk" in lists["object"]
    assert lists["object"][:10] == lists["live"][:10] and lists["object"][-5:] == lists["live"][-5:]
    assert fill_placeholder("a <s*> in the jungle", "dog") == "a dog in the jungle"


def test_load_fake_tree(fake_root):
    subjects = load_dreambench(fake_root, subjects=list(FAKE_SUBJECTS), input_image_index={"backpack": 3})
    assert [s.name for s in subjects] == list(FAKE_SUBJECTS)
    dog, backpack, bear = subjects
    assert (dog.class_noun, dog.live, backpack.class_noun, backpack.live) == ("dog", True, "backpack", False)
    assert bear.class_noun == "stuffed animal"
    assert [len(s.image_paths) for s in subjects] == list(FAKE_SUBJECTS.values())  # notes.txt skipped
    assert dog.input_image == fake_root / "dog6" / "00.jpg"
    assert backpack.input_image == fake_root / "backpack" / "03.jpg"
    assert all(len(s.prompts) == 25 for s in subjects)
    assert "a <s*> wearing a red hat" in dog.prompts and "a <s*> wearing a red hat" not in backpack.prompts

    again = load_dreambench(fake_root, subjects=["bear_plushie"], input_image_index=1, placeholder="S*")
    assert again[0].input_image.name == "01.jpg"
    assert all("S*" in p and "<s*>" not in p for p in again[0].prompts)


def test_missing_and_empty_folders(fake_root):
    with pytest.raises(FileNotFoundError, match="teapot"):
        load_dreambench(fake_root, subjects=["dog6", "teapot"])
    with pytest.raises(FileNotFoundError, match="27 subject folder.*backpack_dog.*candle.*wolf_plushie"):
        load_dreambench(fake_root)  # every shipped subject: all missing folders are named
    (fake_root / "vase").mkdir()
    with pytest.raises(FileNotFoundError, match="vase.*no image"):
        load_dreambench(fake_root, subjects=["vase"])
    with pytest.raises(ValueError, match="unknown subjects"):
        load_dreambench(fake_root, subjects=["not_a_subject"])


def test_bad_input_image_index(fake_root):
    with pytest.raises(ValueError, match="bear_plushie"):
        load_dreambench(fake_root, subjects=["dog6", "bear_plushie"], input_image_index=2)
    with pytest.raises(ValueError, match="dog6"):
        load_dreambench(fake_root, subjects=["dog6"], input_image_index={"dog6": -1})


def test_prompts_without_placeholder(fake_root, tmp_path):
    data = json.loads(DEFAULT_PROMPTS_FILE.read_text())
    data["object_prompts"][3] = "a backpack on a cobblestone street"
    bad = tmp_path / "prompts.json"
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="a backpack on a cobblestone street"):
        load_dreambench(fake_root, subjects=["backpack"], prompts_file=bad)
    with pytest.raises(ValueError, match="a dog"):
        fill_placeholder("a dog", "dog")

    braces = tmp_path / "braces.json"
    data = json.loads(DEFAULT_PROMPTS_FILE.read_text())
    for key in ("object_prompts", "live_subject_prompts"):
        data[key] = [p.replace(PLACEHOLDER, "{}") for p in data[key]]
    braces.write_text(json.dumps({**data, "placeholder": "{}"}))
    assert load_prompt_lists(braces) == load_prompt_lists()


def test_custom_subjects_file(fake_root, tmp_path):
    custom = tmp_path / "subjects.json"
    entries = [
        {"name": "backpack", "class_noun": "bag", "live": False, "prompts": ["a <s*> on the moon"]},
        {"name": "dog6", "class_noun": "puppy", "live": True},
    ]
    custom.write_text(json.dumps({"subjects": entries}))
    bag, puppy = load_dreambench(fake_root, subjects_file=custom)
    assert (bag.class_noun, bag.prompts) == ("bag", ["a <s*> on the moon"])
    assert puppy.class_noun == "puppy" and len(puppy.prompts) == 25

    entries[0]["prompts"] = ["a bag on the moon"]
    custom.write_text(json.dumps({"subjects": entries}))
    with pytest.raises(ValueError, match="a bag on the moon"):
        load_dreambench(fake_root, subjects_file=custom)


def test_load_images(fake_root):
    paths = sorted((fake_root / "backpack").glob("*.jpg"))
    images = load_images(paths, size=16)
    assert images.shape == (4, 3, 16, 16) and images.dtype == torch.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert load_images(paths[:1]).shape == (1, 3, 20, 24)
    with pytest.raises(ValueError, match="different shapes"):
        load_images(paths)
