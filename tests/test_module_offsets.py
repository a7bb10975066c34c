"""Hypernetwork offsets on the UNet's ResNet convolutions and feed-forward linears (``lora_modules``,
:mod:`models.module_offsets`): per-sample, exactly a weight offset, inactive outside a personalized call, and
exported in the layout diffusers and kohya consumers load."""

from __future__ import annotations

import pytest
import torch

from models.artifact import ConceptArtifact
from models.module_offsets import module_targets, shaped_factors
from models.personalizer import Personalizer, PersonalizerConfig

PROMPT = "a photo of a <s*>"


@pytest.fixture(scope="module")
def personalizer(backbone, tiny_personalizer_config) -> Personalizer:
    cfg = PersonalizerConfig(**{**tiny_personalizer_config.__dict__, "lora_modules": ("ff", "resnet")})
    torch.manual_seed(0)
    return Personalizer(backbone, cfg)


def _inputs(backbone, n: int = 2):
    g = torch.Generator().manual_seed(0)
    cfg = backbone.unet.config
    latents = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    v = backbone.token_embedding_table()[1000].expand(n, -1)
    return latents, torch.full((n,), 500), backbone.tokenize([PROMPT] * n), v


def _cores(personalizer, n: int = 2, scale: float = 0.3) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    rank = personalizer.hypernetwork.rank
    return torch.randn(n, len(personalizer.hypernetwork.names), rank, rank, generator=g) * scale


def test_targets_are_the_ff_linears_and_resnet_convolutions(backbone, personalizer):
    targets = module_targets(backbone.unet, ("ff", "resnet"))
    convs = [n for n in targets if n.endswith(("conv1", "conv2"))]
    ffs = [n for n in targets if ".ff.net." in n]
    assert convs and ffs and len(convs) + len(ffs) == len(targets)
    conv = backbone.unet.get_submodule(convs[0])
    assert targets[convs[0]] == (conv.in_channels * 9, conv.out_channels)  # 3 x 3 kernels
    assert set(targets) < set(personalizer.hypernetwork.names)  # beside the attention projections
    with pytest.raises(ValueError, match="lora_modules may name"):
        module_targets(backbone.unet, ("norms",))


@pytest.mark.parametrize("kind", ["conv1", "ff.net.2"])
def test_each_sample_gets_exactly_its_own_weight_offset(backbone, personalizer, kind):
    latents, t, ids, v = _inputs(backbone)
    deltas = personalizer.deltas(_cores(personalizer))
    name = next(n for n in personalizer.hypernetwork.names if n.endswith(kind))
    with torch.no_grad():
        ours = backbone.personalized_unet(latents, t, ids, v, {name: deltas[name]}, alpha=1.0)
        base = backbone.personalized_unet(latents, t, ids, v, None, alpha=1.0)
        module = backbone.unet.get_submodule(name)
        weight = module.weight.detach().clone()
        dense = []
        try:
            for b in range(2):
                d = deltas[name]
                module.weight.copy_(weight + (d.up @ d.core[b] @ d.down).reshape(weight.shape))
                dense.append(
                    backbone.personalized_unet(latents[b : b + 1], t[:1], ids[:1], v[:1], None, alpha=1.0)
                )
        finally:
            module.weight.copy_(weight)
    torch.testing.assert_close(ours, torch.cat(dense), atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-3
    assert not torch.allclose(ours[0], ours[1], atol=1e-4)  # two samples, two cores


def test_offsets_act_only_inside_a_personalized_call(backbone, personalizer):
    latents, t, ids, v = _inputs(backbone, 1)
    context = backbone.encode_text(backbone.tokenize(["a photo of a dog"]))
    with torch.no_grad():
        before = backbone.unet(latents, t, encoder_hidden_states=context).sample
        zero = backbone.personalized_unet(
            latents, t, ids, v, personalizer.deltas(_cores(personalizer, 1, 0.0))
        )
        backbone.personalized_unet(latents, t, ids, v, personalizer.deltas(_cores(personalizer, 1)))
        after = backbone.unet(latents, t, encoder_hidden_states=context).sample
        plain = backbone.personalized_unet(latents, t, ids, v, None)
    assert torch.equal(before, after)  # nothing stays active after the call
    torch.testing.assert_close(zero, plain, atol=1e-6, rtol=0)  # zero cores: the base model


@pytest.fixture(scope="module")
def artifact(backbone, personalizer) -> ConceptArtifact:
    cores = _cores(personalizer, 1)[0]
    static = shaped_factors(backbone.unet, personalizer.hypernetwork.static_lora(cores))
    return ConceptArtifact(
        v_star=backbone.token_embedding_table()[1000].detach().float(),
        lora={k: (d.detach(), u.detach()) for k, (d, u) in static.items()},
        placeholder=backbone.placeholder,
        nearest_token="dog</w>",
        nearest_token_id=1929,
        alpha=1.0,
        base_model=backbone.name_or_path,
        fingerprint=backbone.fingerprint(),
        steps=12,
    )


def test_the_artefact_holds_convolutions_in_the_lora_file_layout_and_reproduces_the_offsets(
    backbone, personalizer, artifact, tmp_path
):
    name = next(n for n in artifact.lora if n.endswith("conv1"))
    conv = backbone.unet.get_submodule(name)
    down, up = artifact.lora[name]
    assert down.shape == (personalizer.hypernetwork.rank, conv.in_channels, 3, 3)
    assert up.shape == (conv.out_channels, personalizer.hypernetwork.rank, 1, 1)
    loaded = ConceptArtifact.load(artifact.save(tmp_path / "c.safetensors"))
    latents, t, ids, v = _inputs(backbone, 1)
    cores = _cores(personalizer, 1)
    with torch.no_grad():
        ours = backbone.personalized_unet(latents, t, ids, v, personalizer.deltas(cores), alpha=1.0)
        static = backbone.personalized_unet(latents, t, ids, v, loaded.deltas(), alpha=1.0)
    torch.testing.assert_close(static, ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["diffusers", "kohya"])
def test_exports_load_in_plain_diffusers_and_match_the_single_path(
    backbone, artifact, tiny_sd_dir, tmp_path, kind
):
    from diffusers import StableDiffusionPipeline

    if kind == "diffusers":
        lora_path, embedding = artifact.export_diffusers(tmp_path), tmp_path / "learned_embeds.safetensors"
    else:
        files = artifact.export_kohya(tmp_path, "teapot", alpha=1.0)
        lora_path, embedding = files["lora"], files["embedding"]
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_textual_inversion(str(embedding), token="<s*>")
    pipe.load_lora_weights(str(lora_path))
    adapted = {n.removesuffix(".lora_A") for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A")}
    assert adapted == set(artifact.lora)  # every convolution and linear, none dropped
    latents, t, _, _ = _inputs(backbone, 1)
    ids = pipe.tokenizer(
        [PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        theirs = pipe.unet(latents, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample
        ours = backbone.personalized_unet(
            latents, t, backbone.tokenize([PROMPT]), artifact.v_star[None], artifact.deltas(), alpha=1.0
        )
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
