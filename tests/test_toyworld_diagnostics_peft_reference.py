"""``python -m toyworld peft-reference``: a one-image LoRA trained and sampled in plain diffusers + peft, the
reference our tuning path is compared with (docs/research/peft_reference.md)."""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from toyworld.diagnostics.peft_reference import ReferenceRecipe, load_pipeline, say, train_lora
from toyworld.instance.concepts import InstanceConcepts

PIPELINE = "assets/toyworld/instance_pipeline"
VALIDATION = "assets/toyworld/instance_validation_concepts"


def _concept(name: str = "star_val0"):
    return InstanceConcepts(VALIDATION, [name], 4, 0, 4).load("<s*>")[0]


def test_the_identifier_is_the_class_noun_or_sks_before_it():
    assert say("a large <s*> on red", "star", "<s*>", "words") == "a large star on red"
    assert say("a large <s*> on red", "star", "<s*>", "sks") == "a large sks star on red"


@pytest.mark.parametrize("latents", ["sample", "mean"])
def test_training_moves_only_the_lora_from_an_unchanged_start(latents):
    pipe = load_pipeline(PIPELINE)
    base = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    concept = _concept()
    losses = train_lora(
        pipe,
        concept.load_input(),
        "a large star in the center on a white background",
        ReferenceRecipe(steps=3, rank=4, batch_size=2, latents=latents),
    )
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    lora_b = [p for n, p in pipe.unet.named_parameters() if ".lora_B." in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at zero (gaussian init) and moved
    after = {n.replace(".base_layer", ""): p for n, p in pipe.unet.named_parameters() if ".lora_" not in n}
    assert after.keys() == base.keys()
    for name, before in base.items():  # the base weights are frozen
        assert torch.equal(after[name], before), name


def test_an_unknown_latent_mode_is_refused():
    pipe = load_pipeline(PIPELINE)
    with pytest.raises(ValueError, match="latents must be 'sample' or 'mean'"):
        train_lora(pipe, _concept().load_input(), "a star", ReferenceRecipe(steps=1, latents="mode"))


def test_the_command_writes_a_row_per_guidance_and_names_bad_input(tmp_path):
    out = tmp_path / "rows.csv"
    cmd = [sys.executable, "-m", "toyworld", "peft-reference", "--names", "star_val0", "--steps", "2", "--rank", "4",
           "--batch-size", "1", "--samples-per-prompt", "1", "--guidance", "1", "3", "--out", str(out)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "mean at guidance 3: identity" in done.stdout, done.stdout
    rows = list(csv.DictReader(out.open()))
    assert [(r["concept"], r["guidance"]) for r in rows] == [("star_val0", "1.0"), ("star_val0", "3.0")]
    assert all(
        0.0 <= float(r["pixel_identity"]) <= 1.0 and 0.0 <= float(r["pixel_prompt_acc"]) <= 1.0 for r in rows
    )
    bad = subprocess.run([*cmd[:4], "--names", "nothing_val9"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().endswith(
        f"--names: nothing_val9 is not in {VALIDATION}"
    )
    bad = subprocess.run([*cmd[:4], "--guidance", "0.5"], capture_output=True, text=True)
    assert bad.returncode == 2 and "--guidance values must be >= 1" in bad.stderr
