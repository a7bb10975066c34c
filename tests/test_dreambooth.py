"""DreamBooth (``tune: [unet]``): every UNet weight tuned, the dense offsets carried by the artefact and applied
only while sampling; the base UNet restored exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.generate.images import generate_images, generate_plain
from evaluation.plan import Setting
from models.artifact import ConceptArtifact
from models.unet_offsets import applied_offsets, restore_unet, unet_offsets, unet_snapshot


def test_offsets_are_applied_inside_the_block_and_the_base_restored_exactly(backbone):
    unet = backbone.unet
    base = unet_snapshot(unet)
    name = next(iter(base))
    offsets = {name: torch.full_like(base[name], 0.25)}
    with applied_offsets(unet, offsets):
        torch.testing.assert_close(dict(unet.named_parameters())[name].detach(), base[name] + 0.25)
    for n, p in unet.named_parameters():
        assert torch.equal(p.detach(), base[n]), n
    with (
        pytest.raises(KeyError, match="does not have"),
        applied_offsets(unet, {"no.such.weight": torch.zeros(1)}),
    ):
        pass


def test_unet_offsets_name_only_the_moved_parameters_and_restore_undoes_them(backbone):
    unet = backbone.unet
    base = unet_snapshot(unet)
    name = next(iter(base))
    with torch.no_grad():
        dict(unet.named_parameters())[name].add_(1.0)
    try:
        offsets = unet_offsets(unet, base)
        assert list(offsets) == [name]
        torch.testing.assert_close(offsets[name], torch.ones_like(base[name]))
    finally:
        restore_unet(unet, base)
    assert unet_offsets(unet, base) == {}


def test_dreambooth_artefact_round_trips_and_samples_the_tuned_weights(backbone, tmp_path):
    """Saved and loaded, the offsets change the images; without them the images are the base model's."""
    g = torch.Generator().manual_seed(0)
    offsets = {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in backbone.unet.named_parameters()}
    art = ConceptArtifact(
        v_star=backbone.token_embedding_table()[1929].detach().float().clone(),
        lora={},
        placeholder=backbone.placeholder,
        nearest_token="dog</w>",
        nearest_token_id=1929,
        alpha=1.0,
        base_model=backbone.name_or_path,
        fingerprint=backbone.fingerprint(),
        steps=12,
        extra={"method": "dreambooth"},
        unet_offsets=offsets,
    )
    loaded = ConceptArtifact.load(art.save(tmp_path / "db.safetensors"))
    assert loaded.unet_offsets.keys() == offsets.keys()
    for n in offsets:
        assert torch.equal(loaded.unet_offsets[n], offsets[n])
    setting = Setting(12, 1.0, 3.0)
    tuned = generate_images(backbone, loaded, ["a <s*> on the beach"], [0], setting, 3)[0]
    plain = generate_plain(backbone, ["a dog on the beach"], [0], setting, 3)[0]
    loaded.unet_offsets = {}
    same_as_words = generate_images(backbone, loaded, ["a <s*> on the beach"], [0], setting, 3)[0]
    np.testing.assert_array_equal(same_as_words, plain)  # v* = "dog"'s row: the words, exactly
    assert not np.array_equal(tuned, plain)


def test_dreambooth_tunes_every_unet_weight_and_its_exports_reproduce_the_tuned_unet(
    tiny_sd_dir, index_dir, tmp_path, backbone
):
    """``tune: [unet]`` trains the UNet alone; the artefact's offsets on a clean backbone and the diffusers export
    (``unet/`` for ``from_pretrained``) give the tuned UNet; ``reset_concept`` restores the base weights."""
    from diffusers import UNet2DConditionModel

    from tests.cli_runs import DREAMBOOTH, fit, tune_args

    cli = fit(tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=3, model=DREAMBOOTH))
    module = cli.model
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable == {f"backbone.unet.{n}" for n, _ in module.backbone.unet.named_parameters()}
    g = torch.Generator().manual_seed(0)
    cfg = backbone.unet.config
    latents = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    with torch.no_grad():
        context = backbone.encode_text(backbone.tokenize(["a photo of a dog"]))
        tuned = module.backbone.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
        base = backbone.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
        assert (tuned - base).abs().max() > 1e-3
        art = ConceptArtifact.load(module.artifact_path)
        assert art.extra["method"] == "dreambooth" and art.unet_offsets
        assert art.fingerprint == backbone.fingerprint()  # the base model's, not the tuned weights'
        with applied_offsets(backbone.unet, art.unet_offsets):
            ours = backbone.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
        torch.testing.assert_close(ours, tuned, atol=1e-5, rtol=0)
        export = module.artifact_path.with_name(f"{module.artifact_path.stem}_diffusers")
        plain = UNet2DConditionModel.from_pretrained(str(export / "unet"))
        torch.testing.assert_close(
            plain(latents, torch.tensor([500]), encoder_hidden_states=context).sample,
            tuned,
            atol=1e-5,
            rtol=0,
        )
        module.reset_concept()
        after = module.backbone.unet(latents, torch.tensor([500]), encoder_hidden_states=context).sample
    assert torch.equal(after, base)
