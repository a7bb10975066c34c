"""The image branch's options (pooled tokens, any transformers vision tower), sampled-alpha pretraining and the
image-encoder fingerprint, on the offline tiny backbone."""

from __future__ import annotations

import pytest
import torch

import train
from lightning_modules.checkpoint import CheckpointMismatchError, check_checkpoint
from models.encoder import FeatureEncoder, image_tokens
from models.image_encoder import feature_widths, tower_fingerprint
from tests.cli_runs import fit, load_ckpt, pretrain_args


def test_image_tokens_pools_as_documented():
    h = torch.randn(2, 5, 8)
    assert torch.equal(image_tokens(h, "cls"), h[:, 0])
    assert torch.allclose(image_tokens(h, "mean"), h[:, 1:].mean(1))
    assert image_tokens(h, "cls_mean").shape == (2, 16)
    with pytest.raises(ValueError, match="image_features"):
        image_tokens(h, "max")


def test_cls_mean_features_read_the_patch_tokens():
    torch.manual_seed(0)
    states = tuple(torch.randn(2, 5, 8) for _ in range(3))
    changed = tuple(s.clone() for s in states)
    for s in changed:
        s[:, 1:] += 1.0  # patch tokens only
    unet = torch.randn(2, 6)
    cls_only = FeatureEncoder(8, 2, 6, feature_dim=4, clip_layer_stride=1, unet_hidden_dim=8)
    both = FeatureEncoder(
        8, 2, 6, feature_dim=4, clip_layer_stride=1, unet_hidden_dim=8, image_features="cls_mean"
    )
    assert torch.equal(cls_only(states, unet), cls_only(changed, unet))
    assert not torch.allclose(both(states, unet), both(changed, unet))


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    """A tiny random DINOv2 (not CLIP) saved like a hub model, with its image processor."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    from models.tiny import CLIP_MEAN, CLIP_STD

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("dinov2") / "tiny-dinov2"
    cfg = Dinov2Config(
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=32,
        patch_size=8,
    )
    Dinov2Model(cfg).save_pretrained(out)
    BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    ).save_pretrained(out)
    return out


def test_non_clip_tower_loads_by_config_and_feeds_the_encoder(
    tiny_sd_dir, dinov2_dir, tiny_personalizer_config
):
    from transformers import Dinov2Model

    from models.backbone import DiffusionBackbone
    from models.personalizer import Personalizer

    bb = DiffusionBackbone.from_pretrained(str(tiny_sd_dir), str(dinov2_dir))
    assert isinstance(bb.image_encoder, Dinov2Model) and bb.clip_image_size == 32
    p = Personalizer(bb, tiny_personalizer_config)
    states = bb.clip_hidden_states(torch.randn(2, 3, 32, 32))
    assert len(states) == 3 and states[0].shape[-1] == 16
    pred = p(states, torch.randn(2, bb.unet_feature_dim()))
    assert pred.v_star.shape == (2, bb.token_dim)


def test_encoder_checkpoint_refused_on_another_image_tower(tiny_sd_dir, dinov2_dir, pretrain_ckpt):
    from models.backbone import DiffusionBackbone

    ckpt = load_ckpt(pretrain_ckpt)
    clip_bb = DiffusionBackbone.from_pretrained(str(tiny_sd_dir), str(tiny_sd_dir))
    assert ckpt["tuning_encoder"]["image_encoder_fingerprint"] == tower_fingerprint(clip_bb.image_encoder)
    check_checkpoint(ckpt, clip_bb, phase="pretrain", source="ckpt")
    dino_bb = DiffusionBackbone.from_pretrained(str(tiny_sd_dir), str(dinov2_dir))
    with pytest.raises(CheckpointMismatchError, match="image encoder"):
        check_checkpoint(ckpt, dino_bb, phase="pretrain", source="ckpt")


def test_sampled_alpha_pretraining_step(tiny_sd_dir, index_dir, tmp_path):
    from lightning import Callback

    seen: list[float] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(pl_module.step_alpha())

    args = pretrain_args(tmp_path, tiny_sd_dir, index_dir, steps=4, model={"alpha_range": [0.5, 1.0]})
    cli = fit(args, Record())
    assert cli.trainer.global_step == 4
    assert len(set(seen)) == 4 and all(0.5 <= a <= 1.0 for a in seen)
    # a function of (seed, step): the same step draws the same alpha again
    assert cli.model.step_alpha() == cli.model.step_alpha()
    assert "train/alpha" in cli.trainer.logged_metrics
    cli.model.eval()
    assert cli.model.step_alpha() == cli.model.alpha  # evaluation uses the configured alpha


def test_alpha_range_is_validated(tiny_sd_dir, index_dir, tmp_path):
    args = pretrain_args(tmp_path, tiny_sd_dir, index_dir, model={"alpha_range": [0.9, 0.5]})
    with pytest.raises(ValueError, match="alpha_range"):
        train.main(args, run=False)


def test_convolutional_tower_loads_by_config_with_mean_pooling(
    tiny_sd_dir, tmp_path, tiny_personalizer_config
):
    """A ConvNeXt (the toy world's image encoder kind): per-stage widths differ, so they are measured."""
    from dataclasses import replace

    from transformers import CLIPImageProcessor, ConvNextConfig, ConvNextModel

    from models.backbone import DiffusionBackbone
    from models.personalizer import Personalizer

    torch.manual_seed(0)
    out = tmp_path / "tiny-convnext"
    cfg = ConvNextConfig(image_size=32, patch_size=2, num_stages=2, hidden_sizes=[8, 12], depths=[1, 1])
    ConvNextModel(cfg).save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out)
    bb = DiffusionBackbone.from_pretrained(str(tiny_sd_dir), str(out))
    assert feature_widths(bb.image_encoder, 32, bb.clip_hidden_states) == [8, 8, 12]
    with pytest.raises(ValueError, match="no \\[CLS\\] token"):
        Personalizer(bb, tiny_personalizer_config)(
            bb.clip_hidden_states(torch.randn(1, 3, 32, 32)), torch.randn(1, bb.unet_feature_dim())
        )
    p = Personalizer(bb, replace(tiny_personalizer_config, image_features="mean", clip_layer_stride=1))
    assert [lin.in_features for lin in p.encoder.clip_linears] == [8, 12]
    pred = p(bb.clip_hidden_states(torch.randn(2, 3, 32, 32)), torch.randn(2, bb.unet_feature_dim()))
    assert pred.v_star.shape == (2, bb.token_dim)


def test_supcon_prefers_embeddings_that_match_objects():
    from toyworld.training.image_encoder import object_pair_batch, supcon_loss

    batch = object_pair_batch(8, seed=0, step=0)
    ids = batch["object_ids"]
    assert ids.tolist() == [i // 2 for i in range(len(ids))]
    # the two views of an object differ in context (pixels differ)
    assert not torch.equal(batch["pixels"][0], batch["pixels"][1])
    aligned = torch.nn.functional.one_hot(ids, 8).float()
    assert supcon_loss(aligned, ids, 0.1) < 0.01 < supcon_loss(aligned[torch.randperm(len(ids))], ids, 0.1)


@pytest.mark.slow
def test_committed_image_encoder_passes_the_probe_gate():
    """The gate before encoder pretraining (issue: the image branch must see the concept): from the features
    DATE reads (mean-pooled ResNet stages), a linear probe trained on base renders recovers shape, colour and
    pattern of the held-out combinations with accuracy >= 0.9."""
    from toyworld.diagnostics.image_probe import probe

    result = probe("assets/toyworld/image_encoder", "mean", [1, 2, 3])
    for attribute in ("shape", "colour", "pattern"):
        assert result[f"combos/{attribute}"] >= 0.9, result


@pytest.mark.slow
def test_committed_encoder_cores_help_at_alpha_1():
    """Pretrained with alpha drawn from [0.5, 1], the predicted cores must not hurt the adapted path alone (alpha
    1, the path every export uses): encoder-only identity on the validation concepts with the predicted cores is
    at least that with zero cores, at the prompt accuracy of zero cores minus one sample in ten.
    Measured (python -m toyworld validate-encoder assets/toyworld/encoder/date.ckpt): identity 0.58 vs 0.17, prompt
    1.00 vs 1.00."""
    from toyworld.named.validation import measure_checkpoint

    m = measure_checkpoint("assets/toyworld/encoder/date.ckpt", alphas=(1.0,))
    assert m["identity_a1"] >= m["identity_a1_zero_cores"] + 0.1, m
    assert m["prompt_a1"] >= m["prompt_a1_zero_cores"] - 0.1, m
