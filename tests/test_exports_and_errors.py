"""Exports, bad input and errors of the training CLI on the offline tiny backbone (see test_training)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch

import train
from datamodules import SkippedImageWarning
from lightning_modules.checkpoint import CheckpointMismatchError
from models.artifact import ConceptArtifact
from tests.cli_runs import (
    PROMPT,
    nan_unet,
    pretrain_args,
    tune_args,
)


def _probe_inputs(backbone, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    unet = backbone.unet.config
    latents = torch.randn(1, unet.in_channels, unet.sample_size, unet.sample_size, generator=g)
    return latents, torch.tensor([500]), backbone.tokenize([PROMPT])


def test_exported_artifact_reproduces_the_tuned_unet(tuned):
    artifact = ConceptArtifact.load(tuned.artifact_path)
    bb = tuned.backbone
    assert artifact.fingerprint == bb.fingerprint()
    assert artifact.alpha == tuned.alpha == 0.5
    assert artifact.steps == 3 and artifact.placeholder == "<s*>"
    assert bb.tokenizer.convert_ids_to_tokens(artifact.nearest_token_id) == artifact.nearest_token
    latents, t, ids = _probe_inputs(bb)
    hard = torch.tensor([artifact.nearest_token_id])
    tuned_deltas = tuned.lora_deltas(tuned.cores)
    with torch.no_grad():
        ours = bb.personalized_unet(latents, t, ids, tuned.v_star, tuned_deltas, tuned.alpha, hard)
        loaded = bb.personalized_unet(
            latents, t, ids, artifact.v_star[None], artifact.deltas(), artifact.alpha, hard
        )
        plain_context = bb.encode_text(bb.tokenize(["a photo of a"]))
        base = bb.unet(latents, t, encoder_hidden_states=plain_context).sample
    torch.testing.assert_close(loaded, ours, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-3  # the comparison is not between two copies of the base model


def test_diffusers_export_loads_in_a_plain_pipeline(tuned, tiny_sd_dir):
    from diffusers import StableDiffusionPipeline

    export = tuned.artifact_path.with_name(f"{tuned.artifact_path.stem}_diffusers")
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_textual_inversion(str(export / "learned_embeds.safetensors"), token="<s*>")
    bb = tuned.backbone
    latents, t, _ = _probe_inputs(bb)

    def unet_output():
        ids = pipe.tokenizer(
            [PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return pipe.unet(latents, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    without_lora = unet_output()
    pipe.load_lora_weights(str(export))
    with_lora = unet_output()
    # LoRA scale lora_alpha / r = 1: diffusers applies the exported factors as they are.
    (lora_config,) = pipe.unet.peft_config.values()
    assert lora_config.lora_alpha == lora_config.r
    assert tuned.cores.abs().max() > 1e-3
    assert (with_lora - without_lora).abs().max() > 1e-3

    # Single path (alpha = 1) is exactly what plain diffusers computes with the LoRA at scale 1.
    _, _, ids = _probe_inputs(bb)
    with torch.no_grad():
        ours = bb.personalized_unet(latents, t, ids, tuned.v_star, tuned.lora_deltas(tuned.cores), alpha=1.0)
    torch.testing.assert_close(with_lora, ours, atol=1e-4, rtol=0)

    images = pipe(PROMPT, num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


# ----- data problems and clear errors -----
def test_unreadable_images_are_skipped_and_named(tiny_sd_dir, index_dir, tmp_path):
    from PIL import Image

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (40, 48), color).save(root / ("sub" if i else ".") / f"img{i}.png")
    (root / "broken.jpg").write_bytes(b"this is not a jpeg")
    # 4 files and batch 4: every batch asks for the broken file.
    args = pretrain_args(tmp_path, tiny_sd_dir, index_dir, steps=2, data={"roots": [str(root)]})
    with pytest.warns(SkippedImageWarning, match="broken.jpg"):
        cli = train.main(["fit", *args])
    assert cli.trainer.global_step == 2
    assert {Path(p).name for p in cli.datamodule.train_dataset.skipped} == {"broken.jpg"}


def _one_line_error(args: list[str], exc: type[BaseException], match: str) -> str:
    with pytest.raises(exc, match=match) as info:
        train.main(["fit", *args])
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_error_empty_data_root(tiny_sd_dir, index_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    args = pretrain_args(tmp_path, tiny_sd_dir, index_dir, data={"roots": [str(tmp_path / "empty")]})
    _one_line_error(args, ValueError, r"no image files .* under image root: .*empty")


def test_error_missing_encoder_checkpoint(tiny_sd_dir, index_dir, tmp_path):
    args = tune_args(tmp_path, tiny_sd_dir, index_dir, tmp_path / "missing.ckpt")
    _one_line_error(args, FileNotFoundError, r"encoder_checkpoint .*missing\.ckpt does not exist")


@pytest.mark.parametrize("kind", ["foreign_dict", "random_bytes"])
def test_error_foreign_encoder_checkpoint(tiny_sd_dir, index_dir, tmp_path, kind):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "foreign_dict":
        torch.save({"state_dict": {}}, path)
        match = r"foreign_dict\.ckpt is not a tuning-encoder checkpoint"
    else:
        path.write_bytes(random.Random(0).randbytes(4096))
        match = r"random_bytes\.ckpt is not a readable PyTorch checkpoint"
    _one_line_error(tune_args(tmp_path, tiny_sd_dir, index_dir, path), CheckpointMismatchError, match)


def test_error_encoder_checkpoint_of_another_base_model(tiny_sd_v_dir, index_dir, pretrain_ckpt, tmp_path):
    args = tune_args(tmp_path, tiny_sd_v_dir, index_dir, pretrain_ckpt)
    _one_line_error(args, CheckpointMismatchError, r"made on base model .*fingerprint")


def test_error_resume_from_missing_checkpoint(tiny_sd_dir, index_dir, tmp_path):
    args = [*pretrain_args(tmp_path, tiny_sd_dir, index_dir), "--ckpt_path", str(tmp_path / "nope.ckpt")]
    _one_line_error(args, FileNotFoundError, r"--ckpt_path .*nope\.ckpt does not exist")


def test_error_resume_from_foreign_checkpoint(tiny_sd_dir, index_dir, tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "foreign.ckpt")
    args = [*pretrain_args(tmp_path, tiny_sd_dir, index_dir), "--ckpt_path", str(tmp_path / "foreign.ckpt")]
    match = r"--ckpt_path .*foreign\.ckpt is not a tuning-encoder checkpoint"
    _one_line_error(args, CheckpointMismatchError, match)


def test_error_resume_tuning_from_a_pretraining_checkpoint(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path):
    # Lightning would otherwise replace the configured model by the checkpoint's class (silently pretraining).
    args = [*tune_args(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt), "--ckpt_path", str(pretrain_ckpt)]
    _one_line_error(args, CheckpointMismatchError, r"is a 'pretrain' checkpoint, expected 'tune'")


def test_nan_loss_names_the_term_and_keeps_the_last_good_checkpoint(
    tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path
):
    (tmp_path / "ckpt").mkdir()
    good = tmp_path / "ckpt" / "last.ckpt"
    shutil.copy(pretrain_ckpt, good)
    before = good.read_bytes()
    cli = train.main(pretrain_args(tmp_path, tiny_sd_dir, index_dir, steps=2, checkpoint_every=1), run=False)
    nan_unet(cli.model)
    with pytest.raises(FloatingPointError, match=r"non-finite loss term\(s\): .*loss/diffusion"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert [p.name for p in (tmp_path / "ckpt").iterdir()] == ["last.ckpt"]
    assert good.read_bytes() == before


def test_nan_loss_keeps_the_existing_artifact(tiny_sd_dir, index_dir, pretrain_ckpt, tuned, tmp_path):
    shutil.copytree(tuned.artifact_path.parent, tmp_path / "concepts")
    files = {p: p.read_bytes() for p in (tmp_path / "concepts").rglob("*") if p.is_file()}
    assert len(files) == 3
    cli = train.main(tune_args(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=2), run=False)
    nan_unet(cli.model)
    with pytest.raises(FloatingPointError, match="loss/diffusion"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert {p for p in (tmp_path / "concepts").rglob("*") if p.is_file()} == set(files)
    assert all(p.read_bytes() == content for p, content in files.items())


# ----- logging and learning -----
