"""The baselines follow diffusers' reference scripts: one-shot LoRA (``train_dreambooth_lora.py``: peft LoRA on the
UNet, "a photo of sks <class>") and textual inversion (``textual_inversion.py``: the class noun as initializer)."""

from __future__ import annotations

import pytest
import torch

import train
from models.artifact import ConceptArtifact
from models.backbone import DiffusionBackbone
from models.unet_lora import lora_parameters
from tests.cli_runs import fit, tune_args


def _unet_inputs(backbone, prompt: str = "a photo of sks stripes", seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cfg = backbone.unet.config
    latents = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    with torch.no_grad():
        context = backbone.encode_text(backbone.tokenize([prompt]))
    return latents, torch.tensor([500]), context


def _unet(unet, inputs) -> torch.Tensor:
    latents, t, context = inputs
    with torch.no_grad():
        return unet(latents, t, encoder_hidden_states=context).sample


def test_lora_starts_as_the_base_unet_and_trains_a_peft_adapter(tiny_sd_dir, index_dir, tmp_path, backbone):
    cli = train.main(tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=3, variant="lora"), run=False)
    module = cli.model
    lora = lora_parameters(module.backbone.unet)
    assert lora and {n for n, p in module.named_parameters() if p.requires_grad} == {
        f"backbone.unet.{n}" for n in lora
    }
    config = module.backbone.unet.peft_config["default"]
    assert (config.r, config.lora_alpha, config.init_lora_weights) == (4, 4, "gaussian")
    assert set(config.target_modules) == {"to_k", "to_q", "to_v", "to_out.0"}
    assert all(p.abs().max() > 0 for n, p in lora.items() if ".lora_A." in n)
    assert all(torch.equal(p, torch.zeros_like(p)) for n, p in lora.items() if ".lora_B." in n)
    inputs = _unet_inputs(backbone)
    assert torch.equal(
        _unet(module.backbone.unet, inputs), _unet(backbone.unet, inputs)
    )  # B = 0: step 0 = base


def test_lora_prompt_is_the_instance_prompt_with_sks(tiny_sd_dir, index_dir, tmp_path, backbone):
    cli = fit(tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=1, variant="lora"))
    module = cli.model
    noun = cli.datamodule.class_noun
    prompts = module.training_prompts(["a photo of a <s*>", "a rendering of a <s*>"])
    assert prompts == [f"a photo of <s*> {noun}"] * 2
    # v* = the embedding of "sks": the soft prompt is token for token the text "a photo of sks <noun>".
    sks = backbone.tokenizer("sks", add_special_tokens=False).input_ids
    assert len(sks) == 1 and module.init_token == "sks"
    v = backbone.token_embedding_table()[sks[0]].unsqueeze(0)
    with torch.no_grad():
        soft = backbone.encode_text(backbone.tokenize(prompts[:1]), v)
        text = backbone.encode_text(backbone.tokenize([f"a photo of sks {noun}"]))
    torch.testing.assert_close(soft, text, atol=1e-6, rtol=0)


def test_lora_caption_instance_prompt_keeps_the_image_caption(tiny_sd_dir, index_dir, tmp_path):
    args = tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=1, variant="lora")
    cli = fit([*args, "--model.init_args.instance_prompt", "{caption}"])
    noun = cli.datamodule.class_noun
    prompts = cli.model.training_prompts(["a large <s*> on the left on a blue background", "a <s*>"])
    assert prompts == [f"a large <s*> {noun} on the left on a blue background", f"a <s*> {noun}"]


def test_lora_export_loads_in_plain_diffusers_and_reproduces_the_tuned_unet(
    tiny_sd_dir, index_dir, tmp_path, backbone
):
    from diffusers import StableDiffusionPipeline

    opt = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.02, "weight_decay": 0.0}}
    cli = fit(
        tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=3, variant="lora", model={"optimizer": opt})
    )
    module = cli.model
    inputs = _unet_inputs(backbone)
    tuned = _unet(module.backbone.unet, inputs)
    assert (tuned - _unet(backbone.unet, inputs)).abs().max() > 1e-3  # the adapter moved
    export = module.artifact_path.with_name(f"{module.artifact_path.stem}_diffusers")
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_lora_weights(str(export))
    torch.testing.assert_close(_unet(pipe.unet, inputs), tuned, atol=1e-5, rtol=0)
    # The evaluation samples the artefact's static factors on a clean backbone: the same UNet.
    artifact = ConceptArtifact.load(module.artifact_path)
    assert artifact.extra["method"] == "lora" and artifact.extra["identifier"] == "sks"
    latents, t, context = inputs
    ids = backbone.tokenize([f"a photo of <s*> {cli.datamodule.class_noun}"])
    with torch.no_grad():
        ours = backbone.personalized_unet(
            latents, t, ids, artifact.v_star[None], artifact.deltas(), alpha=1.0
        )
    torch.testing.assert_close(ours, tuned, atol=1e-5, rtol=0)


def test_textual_inversion_starts_at_the_class_noun(tiny_sd_dir, index_dir, tmp_path, backbone):
    cli = fit(tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=0, variant="textual_inversion"))
    module = cli.model
    noun = cli.datamodule.class_noun
    (token,) = backbone.tokenizer(noun, add_special_tokens=False).input_ids
    word = backbone.token_embedding_table()[token]
    assert word.norm() > 0
    assert torch.equal(module.v_star[0], word)
    artifact = ConceptArtifact.load(module.artifact_path)
    assert artifact.steps == 0 and torch.equal(artifact.v_star, word) and artifact.nearest_token_id == token
    assert all(d.abs().max() == 0 for d, _ in artifact.lora.values())  # no LoRA: down = M·A with M = 0
    optimizer = module.configure_optimizers()
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (
        2e-3,
        (0.9, 0.999),
        1e-2,
        1e-8,
    )
    assert [p for g in optimizer.param_groups for p in g["params"]] == [module.v_star]


def test_multi_word_class_noun_starts_at_its_head_noun(tiny_sd_dir, index_dir, tmp_path, backbone):
    cli = fit(
        tune_args(tmp_path, tiny_sd_dir, index_dir, None, steps=0, variant="textual_inversion")
        + ["--data.init_args.class_noun", "stuffed animal"]
    )
    (animal,) = backbone.tokenizer("animal", add_special_tokens=False).input_ids
    assert torch.equal(cli.model.v_star[0], backbone.token_embedding_table()[animal])


def test_instance_prompt_needs_a_fixed_token(tiny_sd_dir):
    from lightning_modules.tuning import ConceptTuning

    with pytest.raises(ValueError, match="instance_prompt"):
        ConceptTuning(
            pretrained_model_name_or_path=str(tiny_sd_dir),
            image_encoder_name_or_path=str(tiny_sd_dir),
            tune=["embedding"],
            init="token",
            instance_prompt="a photo of {identifier} {class_noun}",
            token_index_cache=None,
        )


def test_backbone_fixture_has_no_adapter(backbone):
    assert isinstance(backbone, DiffusionBackbone) and not lora_parameters(backbone.unet)
