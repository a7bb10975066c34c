"""``evaluate.py sample``: a concept file sampled in new contexts into one grid; mistakes are one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from models.artifact import ConceptArtifact
from models.attention import lora_targets


@pytest.fixture(scope="module")
def concept_file(backbone, tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    lora = {
        name: (torch.randn(4, n_in, generator=g) * 0.3, torch.randn(n_out, 4, generator=g) * 0.3)
        for name, (n_in, n_out) in lora_targets(backbone.unet).items()
    }
    art = ConceptArtifact(
        v_star=backbone.token_embedding_table()[1929].detach().float().clone(),
        lora=lora,
        placeholder=backbone.placeholder,
        nearest_token="dog</w>",
        nearest_token_id=1929,
        alpha=0.5,
        base_model=backbone.name_or_path,
        fingerprint=backbone.fingerprint(),
        steps=12,
        extra={"method": "date"},
    )
    return art.save(tmp_path_factory.mktemp("concept") / "dog.safetensors")


def _sample(concept, out, prompts, *extra):
    import json

    return evaluate.main(
        [
            "sample",
            "--concept",
            str(concept),
            "--out",
            str(out),
            "--prompts",
            json.dumps(prompts),
            "--num_inference_steps",
            "3",
            "--samples_per_prompt",
            "2",
            *extra,
        ]
    )


def test_sample_writes_one_row_per_prompt_and_is_seeded(concept_file, tmp_path):
    prompts = ["a photo of a <s*>", "a <s*> on the beach"]
    path = _sample(concept_file, tmp_path / "grid.png", prompts, "--scale", "1")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (
        2 * 33 + 1,
        2 * 33 + 1,
        3,
    )  # 2 rows (prompts) x 2 columns (samples), 32 px + borders
    assert (tmp_path / "grid.txt").read_text().splitlines() == [
        f"row {i + 1}: {p}" for i, p in enumerate(prompts)
    ]
    again = np.asarray(Image.open(_sample(concept_file, tmp_path / "again.png", prompts, "--scale", "1")))
    np.testing.assert_array_equal(grid, again)
    other = np.asarray(
        Image.open(_sample(concept_file, tmp_path / "o.png", prompts, "--scale", "1", "--seed", "5"))
    )
    assert not np.array_equal(grid, other)


def test_sample_mistakes_are_one_line(concept_file, tmp_path, capsys):
    for args, message in (
        (["--concept", str(tmp_path / "missing.safetensors"), "--prompts", '["a <s*>"]'], "does not exist"),
        (["--concept", str(concept_file), "--prompts", '["a dog"]'], "does not contain the placeholder"),
        (["--concept", str(concept_file)], "sample needs --concept"),
        (["--concept", str(concept_file), "--prompts", '["a <s*>"]', "--words", " "], "--words is empty"),
    ):
        with pytest.raises(SystemExit) as exc:
            evaluate.main(["sample", *args])
        assert exc.value.code == 2
        assert message in capsys.readouterr().err


def test_sample_with_words_puts_what_the_words_give_under_each_prompt(concept_file, backbone, tmp_path):
    """``--words dog``: after each prompt's row, the same prompt said in words, sampled without the concept from the
    same seeds; those rows are exactly the base model's images of the words, the concept rows are not."""
    from evaluation.generate.images import generate_plain
    from evaluation.plan import Setting

    prompts = ["a photo of a <s*>", "a <s*> on the beach"]
    path = _sample(concept_file, tmp_path / "grid.png", prompts, "--scale", "1", "--words", "dog")
    grid = np.asarray(Image.open(path))
    assert grid.shape == (4 * 33 + 1, 2 * 33 + 1, 3)  # 4 rows: prompt, words, prompt, words
    assert (tmp_path / "grid.txt").read_text().splitlines() == [
        "row 1: a photo of a <s*>",
        "row 2: a photo of a dog (the words alone, no concept, same seeds)",
        "row 3: a <s*> on the beach",
        "row 4: a dog on the beach (the words alone, no concept, same seeds)",
    ]
    alone = np.asarray(Image.open(_sample(concept_file, tmp_path / "alone.png", prompts, "--scale", "1")))
    cell = lambda g, r, c: g[1 + r * 33 : r * 33 + 33, 1 + c * 33 : c * 33 + 33]  # noqa: E731
    for c in range(2):  # the concept rows are those of a run without --words
        np.testing.assert_array_equal(cell(grid, 0, c), cell(alone, 0, c))
        np.testing.assert_array_equal(cell(grid, 2, c), cell(alone, 1, c))
    words = generate_plain(backbone, ["a dog on the beach"] * 2, [1000, 1001], Setting(12, 0.5, 3.0), 3)
    for c in range(2):
        np.testing.assert_array_equal(cell(grid, 3, c), words[c])
        assert not np.array_equal(cell(grid, 3, c), cell(grid, 2, c))


def test_sample_says_the_class_noun_of_an_instance_prompt_concept(concept_file, backbone, tmp_path):
    """A one-shot LoRA concept was tuned on "a photo of sks dog": sampling says "<s*> dog" where the prompt says
    "<s*>" (v* is the embedding of "sks"), exactly as the evaluation does, never "a sks on the beach"."""
    from evaluation.generate.images import generate_images
    from evaluation.plan import Setting

    art = ConceptArtifact.load(concept_file)
    art.extra.update(
        instance_prompt="a photo of {identifier} {class_noun}", identifier="sks", class_noun="dog"
    )
    path = art.save(tmp_path / "sks.safetensors")
    grid = np.asarray(
        Image.open(_sample(path, tmp_path / "grid.png", ["a <s*> on the beach"], "--scale", "1"))
    )
    assert (tmp_path / "grid.txt").read_text().splitlines() == ["row 1: a <s*> dog on the beach"]
    said = generate_images(backbone, art, ["a <s*> dog on the beach"] * 2, [0, 1], Setting(12, 0.5, 3.0), 3)
    for c in range(2):
        np.testing.assert_array_equal(grid[1 : 1 + 32, 1 + c * 33 : c * 33 + 33], said[c])
