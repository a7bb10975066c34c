"""DreamBooth's prior preservation (``prior_class_images``): class images from the base model before the first step,
a class row per instance row in every step, ``instance + prior_loss_weight x class`` as train_dreambooth.py has it."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

import train
from datamodules.concept import TuningConcept
from lightning_modules.prior import class_prompts
from tests.cli_runs import DREAMBOOTH, tune_args


def test_class_prompts_fill_the_class_noun():
    concept = TuningConcept("x", Image.new("RGB", (8, 8)), "teapot", ("a photo of a {}", "a {} on a table"))
    assert class_prompts(concept, 3, None) == [
        "a photo of a teapot",
        "a teapot on a table",
        "a photo of a teapot",
    ]
    assert class_prompts(concept, 2, "a {class_noun} in a kitchen") == ["a teapot in a kitchen"] * 2
    assert class_prompts(concept, 1, "a photo of dog") == ["a photo of dog"]
    with pytest.raises(ValueError, match="class noun"):
        class_prompts(TuningConcept("x", Image.new("RGB", (8, 8))), 1, None)


def _fit(tmp_path, tiny_sd_dir, index_dir, **model):
    cli = train.main(
        tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=2, model={**DREAMBOOTH, **model}), run=False
    )
    seen: list[dict] = []  # each step's logged losses (the values the optimiser saw)
    log_step = cli.model.log_step
    cli.model.log_step = lambda losses, extras, batch_size: (
        seen.append(dict(losses)),
        log_step(losses, extras, batch_size),
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return cli.model, seen


def test_prior_rows_come_from_the_base_model_and_enter_the_loss(tiny_sd_dir, index_dir, tmp_path, backbone):
    module, seen = _fit(
        tmp_path / "prior", tiny_sd_dir, index_dir, prior_class_images=3, prior_inference_steps=2
    )
    prior = module.prior
    noun = module.concept().class_noun
    assert prior.latents.shape[0] == 3 and all(noun in p and "<s*>" not in p for p in prior.prompts)
    # The class images are the base model's: the same prompts and seed on an untouched backbone give them again.
    again = type(prior)(3, 1.0, None, prior.guidance, 2, module.seed)
    again.prepare(backbone, module.concept())
    torch.testing.assert_close(again.latents, prior.latents, atol=1e-5, rtol=0)
    assert len(seen) == 2 and all("loss/prior" in s for s in seen)
    for s in seen:
        torch.testing.assert_close(s["loss"], s["loss/diffusion"] + s["loss/prior"])
    # weight 0: the same instance loss, no prior in the total
    _, plain = _fit(
        tmp_path / "zero",
        tiny_sd_dir,
        index_dir,
        prior_class_images=3,
        prior_inference_steps=2,
        prior_loss_weight=0.0,
    )
    torch.testing.assert_close(plain[0]["loss"], plain[0]["loss/diffusion"])
    torch.testing.assert_close(plain[0]["loss/diffusion"], seen[0]["loss/diffusion"])


def test_prior_preservation_needs_the_unet_tuned(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path):
    args = tune_args(
        tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=1, model={"prior_class_images": 4}
    )
    with pytest.raises(ValueError, match="needs 'unet' or 'unet_lora' in tune"):
        train.main(args, run=False)
