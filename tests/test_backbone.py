"""The backbone loads through from_pretrained, the tiny folder is a real diffusers pipeline, tokenizer is CLIP's."""

from __future__ import annotations

import time

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from models.backbone import DiffusionBackbone
from models.clip_tokenizer import CLIP_VOCAB_SIZE, load_clip_tokenizer, write_clip_tokenizer
from models.hub import ModelNotAvailableError, resolve_model_path
from models.placeholder import PlaceholderError, add_placeholder_token
from models.tiny import write_tiny_backbone
from models.unet_features import unet_feature_dim


def test_clip_tokenizer_is_the_real_vocabulary(tmp_path):
    tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path))
    assert len(tok) == CLIP_VOCAB_SIZE == 49408
    assert tok("a photo of a dog").input_ids == [49406, 320, 1125, 539, 320, 1929, 49407]
    # Lower-casing, punctuation and the end-of-word marker behave as in OpenAI's tokenizer.
    assert tok("A Photo, of a DOG!").input_ids == [49406, 320, 1125, 267, 539, 320, 1929, 256, 49407]
    assert tok.convert_ids_to_tokens([1929]) == ["dog</w>"]


def test_tiny_folder_loads_in_plain_diffusers_and_samples(tiny_sd_dir):
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir))
    assert len(pipe.tokenizer) == 49408
    assert pipe.image_encoder is not None and pipe.feature_extractor is not None
    out = pipe(
        "a photo of a dog",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    )
    images = out.images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    again = pipe(
        "a photo of a dog",
        num_inference_steps=2,
        height=32,
        width=32,
        output_type="pt",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.equal(images, again)


def test_tiny_build_is_deterministic_and_round_trips(tiny_sd_dir, tmp_path):
    other = write_tiny_backbone(tmp_path / "again")
    a = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir), subfolder="unet")
    b = UNet2DConditionModel.from_pretrained(str(other), subfolder="unet")
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    # save -> load gives the identical function
    a.save_pretrained(tmp_path / "unet_copy")
    c = UNet2DConditionModel.from_pretrained(str(tmp_path / "unet_copy"))
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx = torch.randn(1, 77, a.config.cross_attention_dim, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(a(x, 10, ctx).sample, c(x, 10, ctx).sample)


def test_backbone_is_frozen_and_sized_from_configs(backbone):
    assert all(not p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training and not backbone.unet.training
    assert backbone.resolution == 32 and backbone.clip_image_size == 32
    assert backbone.token_dim == backbone.text_encoder.config.hidden_size
    assert backbone.placeholder_id == 49408 and backbone.prediction_type == "epsilon"
    # the text encoder's table is not resized for the placeholder
    assert backbone.token_embedding_table().shape[0] == 49408


def test_unet_feature_dim_matches_sd15_formula(backbone):
    # SD 1.x: conv_in 320, down residuals 320x3, 640x3, 1280x3, 1280x2, mid 1280 -> 10,880 (E4T)
    assert unet_feature_dim((320, 640, 1280, 1280), 2) == 10880
    feats = backbone.unet_encoder_features(
        torch.randn(2, 4, 16, 16), torch.tensor([1, 999]), backbone.encode_text(backbone.tokenize(["", ""]))
    )
    assert feats.shape == (2, backbone.unet_feature_dim())


def test_v_prediction_backbone(tiny_sd_v_dir):
    bb = DiffusionBackbone.from_pretrained(str(tiny_sd_v_dir), str(tiny_sd_v_dir))
    assert bb.prediction_type == "v_prediction"


def test_placeholder_collision_is_refused(tmp_path):
    tok = load_clip_tokenizer(write_clip_tokenizer(tmp_path))
    for existing in ("dog", "<|endoftext|>", "photo"):
        with pytest.raises(PlaceholderError, match="already exists"):
            add_placeholder_token(tok, existing)
    with pytest.raises(PlaceholderError):
        add_placeholder_token(tok, "two words")
    new_id = add_placeholder_token(tok, "<s*>")
    assert new_id == 49408 and tok("a <s*> toy").input_ids[2] == new_id
    with pytest.raises(PlaceholderError, match="already exists"):
        add_placeholder_token(tok, "<s*>")


def test_prompt_without_placeholder_is_an_error(backbone):
    with pytest.raises(PlaceholderError, match="'a photo of a dog'"):
        backbone.tokenize(["a photo of a <s*>", "a photo of a dog"], require_placeholder=True)


def test_uncached_hub_id_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ModelNotAvailableError, match="pass a local folder"):
        resolve_model_path("nobody-here/no-such-model-xyz")
    with pytest.raises(ModelNotAvailableError, match="does not exist"):
        resolve_model_path("./no/such/folder")
    assert time.perf_counter() - start < 5.0


@pytest.mark.parametrize("name, low, high", [("tiny", 0.5e6, 2e6), ("small25m", 20e6, 30e6)])
def test_backbone_configs_build(name, low, high):
    from omegaconf import OmegaConf

    from models.tiny import DEFAULT_CONFIG

    cfg = OmegaConf.to_container(OmegaConf.load(DEFAULT_CONFIG.parent / f"{name}.yaml"), resolve=True)
    unet = UNet2DConditionModel(**cfg["unet"])
    assert low < sum(p.numel() for p in unet.parameters()) < high
    assert unet.config.cross_attention_dim == cfg["text_encoder"]["hidden_size"]


def test_fingerprint_does_not_depend_on_the_path_the_model_was_loaded_from(backbone, tiny_sd_dir, tmp_path):
    link = tmp_path / "same-model"
    link.symlink_to(tiny_sd_dir, target_is_directory=True)
    other = DiffusionBackbone.from_pretrained(str(link), str(link))
    assert other.fingerprint() == backbone.fingerprint()
    # Recorded by the earlier, path-dependent formula (the load folder was hashed too): still this model.
    legacy = backbone.fingerprint(load_path=str(tiny_sd_dir))
    assert legacy != backbone.fingerprint()
    assert other.matches_fingerprint(legacy, recorded_base_model=str(tiny_sd_dir))
    assert backbone.matches_fingerprint(legacy) and not other.matches_fingerprint(legacy)
