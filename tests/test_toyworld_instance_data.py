"""Encoder pretraining on the instance world (toyworld/instance/data.py): the items (training distribution only,
the category word replaced by the placeholder, one concept per item, resumable) and the validation callback's
pixel scores (renders of the concept in the asked contexts score high identity and full prompt accuracy; other
instances of the category score lower)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
import torch

from toyworld.instance.concepts import concept_instances, input_context, prompt_contexts
from toyworld.instance.data import InstanceConceptDataset, InstanceValidationIdentity
from toyworld.instance.render import render
from toyworld.instance.world import CATEGORIES, Context, instance_split, sample_instance
from toyworld.named.world import seeded_rng, to_tensor


def test_instance_items_train_through_the_ordinary_pretrain_module():
    from datamodules.pretrain import PretrainDataModule

    data = InstanceConceptDataset(length=16, seed=3, clip_size=64)
    module = PretrainDataModule(dataset=data, batch_size=8, seed=3)
    batch = next(iter(module.train_dataloader()))
    assert batch["pixel_values"].shape == (8, 3, 32, 32)
    assert batch["clip_pixel_values"].shape == (8, 3, 64, 64)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    for prompt in batch["prompt"]:
        assert prompt.count("<s*>") == 1 and not any(f" {c} " in f" {prompt} " for c in CATEGORIES)
    assert len(set(batch["concept_id"].tolist())) == 8  # every item its own concept
    assert all(instance_split(data.scene(0, k)[0]) == "train" for k in range(16))
    # a pure function of (seed, epoch, k): the same item twice, another epoch another instance
    assert torch.equal(data[(0, 5)]["pixel_values"], data[(0, 5)]["pixel_values"])
    assert data.scene(0, 5)[0] != data.scene(1, 5)[0]
    assert data[(1, 5)]["concept_id"] == 16 + 5
    with pytest.raises(IndexError):
        data[16]
    with pytest.raises(ValueError, match="length"):
        InstanceConceptDataset(length=0)


def test_validation_scores_renders_of_the_concept_above_other_instances():
    callback = InstanceValidationIdentity(prompts_per_concept=2, n_concepts=8)
    images, prompts, wanted = callback.inputs(32, "<s*>")
    concepts = concept_instances("validation")
    assert images.shape == (8, 3, 32, 32) and [len(p) for p in prompts] == [2] * 8
    assert all(p.count("<s*>") == 1 for ps in prompts for p in ps)
    assert wanted[0] == asdict(prompt_contexts(concepts[0][2], 2, 0, concepts[0][0])[0])
    expected = to_tensor(np.stack([render(inst, input_context(inst)) for _, _, inst in concepts]))
    assert torch.allclose(images, expected)
    # the concept itself rendered where each prompt asks (the ceiling) against another instance of its category
    # there (what the words give; the held-out "arrow" has no training instances, so a fresh validation one)
    rng = seeded_rng(5)
    own, others = [], []
    for i, (_, _, inst) in enumerate(concepts):
        other = sample_instance(rng, "train" if inst.category != "arrow" else "validation", inst.category)
        for w in wanted[2 * i : 2 * i + 2]:
            ctx = Context(**w)
            own.append(render(inst, ctx))
            others.append(render(other, ctx))
    ceiling = callback.score(_unit(own), images, wanted)
    words = callback.score(_unit(others), images, wanted)
    assert ceiling["prompt"] == 1.0 and ceiling["identity_acc"] == 1.0
    assert ceiling["identity"] > words["identity"] + 0.2, (ceiling, words)


def _unit(arrays):
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0


def test_target_in_another_context_keeps_the_input_and_moves_the_target():
    same = InstanceConceptDataset(length=8, seed=4, clip_size=64)
    other = InstanceConceptDataset(length=8, seed=4, clip_size=64, target_context="other")
    for k in range(8):
        a, b = same[(0, k)], other[(0, k)]
        # the encoder reads exactly the render the "same" item uses as input and target
        assert torch.equal(b["clip_pixel_values"], a["clip_pixel_values"])
        assert torch.equal(b["encoder_pixel_values"], a["pixel_values"])
        assert "encoder_pixel_values" not in a
        # the target is that instance elsewhere, with its own caption: another background, position or size
        assert b["prompt"] != a["prompt"] and b["prompt"].count("<s*>") == 1
        assert not torch.equal(b["pixel_values"], a["pixel_values"])
        assert b["concept_id"] == a["concept_id"]
    with pytest.raises(ValueError, match="target_context"):
        InstanceConceptDataset(target_context="elsewhere")


def test_the_encoder_reads_encoder_pixel_values_when_a_batch_has_them(tiny_sd_dir, tiny_personalizer_config):
    from datamodules.pretrain import PretrainDataModule
    from lightning_modules import EncoderPretraining

    module = EncoderPretraining(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        personalizer=tiny_personalizer_config,
        token_index_mode="torch",
        token_index_cache=None,
    )
    module.setup("fit")
    batch = PretrainDataModule(synthetic_concepts=8, synthetic_holdout=1, batch_size=4).probe_batch(4)
    seen = []  # what the encoder reads: (noisy latents, timesteps)
    predict = module.predict_concepts
    module.predict_concepts = lambda b, noisy, t: seen.append((noisy, t)) or predict(b, noisy, t)
    _, plain = module.model_step(batch)
    _, again = module.model_step(batch)
    assert torch.equal(again["v_star"], plain["v_star"])  # seeded by (seed, step)
    # the target itself as the encoder's view: its own noise and timestep, never the target's noisy latent
    _, itself = module.model_step({**batch, "encoder_pixel_values": batch["pixel_values"]})
    assert not torch.allclose(seen[2][0], seen[0][0]) and not torch.equal(seen[2][1], seen[0][1])
    # another view: the UNet feature branch reads it (the image branch still reads clip_pixel_values)
    _, flipped = module.model_step({**batch, "encoder_pixel_values": batch["pixel_values"].flip(-1)})
    assert torch.equal(seen[3][1], seen[2][1]) and not torch.allclose(seen[3][0], seen[2][0])
    assert not torch.allclose(flipped["v_star"], itself["v_star"], atol=1e-4)
