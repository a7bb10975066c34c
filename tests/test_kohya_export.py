"""Kohya / Automatic1111 / ComfyUI concept files: loaded by plain diffusers, merged by the consumers' alpha rule.

The concept has random, non-zero LoRA factors on every target of the tiny backbone, so nothing here can pass
with an empty or zero LoRA.
"""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from models.artifact import ConceptArtifact
from models.attention import lora_targets
from models.export_kohya import kohya_unet_name, model_family

PROMPT = "a photo of a <s*>"
RANK = 4


@pytest.fixture(scope="module")
def artifact(backbone) -> ConceptArtifact:
    g = torch.Generator().manual_seed(7)
    lora = {}
    for name, (n_in, n_out) in lora_targets(backbone.unet).items():
        down = torch.randn(RANK, n_in, generator=g) * 0.3
        up = torch.randn(n_out, RANK, generator=g) * 0.3
        lora[name] = (down, up)
    table = backbone.token_embedding_table().detach().float()
    v_star = table[1000] + 0.5 * table.std() * torch.randn(table.shape[1], generator=g)
    return ConceptArtifact(
        v_star=v_star,
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


def _probe(backbone):
    g = torch.Generator().manual_seed(0)
    cfg = backbone.unet.config
    latents = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    return latents, torch.tensor([500])


def _merged_deltas(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The rule ComfyUI (weight_adapter/lora.py) and A1111 (network.py calc_scale) apply to a kohya file:
    ``alpha / rank · up @ down`` with rank = ``down.shape[0]``, and scale 1.0 when the module has no alpha."""
    out = {}
    for key, down in state_dict.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        up = state_dict[f"{name}.lora_up.weight"]
        alpha = state_dict.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        out[name] = scale * (up.float() @ down.float())
    return out


@pytest.mark.parametrize("alpha", [None, 1.0])
def test_kohya_merge_rule_gives_the_projects_delta_for_every_module(artifact, backbone, tmp_path, alpha):
    files = artifact.export_kohya(tmp_path, "teapot", alpha=alpha)
    sd = load_file(str(files["lora"]))
    merged = _merged_deltas(sd)
    assert set(merged) == {kohya_unet_name(n) for n in artifact.lora}
    # Alpha is never lost: every module carries it, and it is the value asked for.
    expected_alpha = float(RANK if alpha is None else alpha)
    assert all(float(sd[f"{n}.alpha"]) == expected_alpha for n in merged)
    # ComfyUI's key map (comfy/lora.py model_lora_keys_unet): "lora_unet_" + the diffusers weight key without
    # ".weight", "." -> "_". Every file module must name exactly one UNet weight of the delta's shape.
    comfy_map = {
        "lora_unet_" + k[: -len(".weight")].replace(".", "_"): k
        for k in backbone.unet.state_dict()
        if k.endswith(".weight")
    }
    weights = backbone.unet.state_dict()
    for path, (down, up) in artifact.lora.items():
        name = kohya_unet_name(path)
        assert comfy_map[name] == f"{path}.weight"
        ours = up @ down
        assert merged[name].shape == weights[comfy_map[name]].shape
        torch.testing.assert_close(merged[name], ours, atol=1e-6, rtol=1e-5)
        assert ours.abs().max() > 0.1
    if alpha is not None:  # the factors really were rescaled, so the rule is what makes the delta right
        assert not torch.allclose(sd[f"{name}.lora_up.weight"], artifact.lora[path][1])


def test_kohya_lora_loads_in_plain_diffusers_and_matches_the_single_path(
    artifact, backbone, tiny_sd_dir, tmp_path
):
    from diffusers import StableDiffusionPipeline

    # alpha 1 != rank 4: diffusers must read .alpha (peft lora_alpha) to reproduce the delta.
    files = artifact.export_kohya(tmp_path, "teapot", alpha=1.0)
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
    pipe.load_textual_inversion(str(files["embedding"]), token="<s*>")
    latents, t = _probe(backbone)

    def unet_output():
        ids = pipe.tokenizer(
            [PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        with torch.no_grad():
            return pipe.unet(latents, t, encoder_hidden_states=pipe.text_encoder(ids)[0]).sample

    without_lora = unet_output()
    pipe.load_lora_weights(str(files["lora"]))
    with_lora = unet_output()
    (config,) = pipe.unet.peft_config.values()
    assert config.r == RANK and config.lora_alpha == 1.0
    n_lora_modules = sum(1 for n, _ in pipe.unet.named_modules() if n.endswith(".lora_A"))
    assert n_lora_modules == len(artifact.lora)
    assert (with_lora - without_lora).abs().max() > 1e-2

    # The project's single path (alpha = 1: W + dW on the soft prompt with v*).
    ids = backbone.tokenize([PROMPT])
    with torch.no_grad():
        ours = backbone.personalized_unet(
            latents, t, ids, artifact.v_star[None], artifact.deltas(), alpha=1.0
        )
        base = backbone.personalized_unet(latents, t, ids, artifact.v_star[None], None, alpha=1.0)
    torch.testing.assert_close(without_lora, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(with_lora, ours, atol=1e-4, rtol=0)


def test_embedding_files_round_trip_in_a1111_kohya_and_diffusers_layouts(artifact, tiny_sd_dir, tmp_path):
    from diffusers import StableDiffusionPipeline

    files = artifact.export_kohya(tmp_path, "teapot")
    expected = artifact.v_star.reshape(1, -1)
    emb = load_file(str(files["embedding"]))
    assert list(emb) == ["emb_params"]
    torch.testing.assert_close(emb["emb_params"], expected, atol=0, rtol=0)
    # A1111 .pt layout; loadable with weights_only=True as ComfyUI and A1111's safe unpickler load it.
    pt = torch.load(files["embedding_pt"], map_location="cpu", weights_only=True)
    assert set(pt["string_to_param"]) == {"*"} and pt["name"] == "teapot" and pt["step"] == 12
    torch.testing.assert_close(pt["string_to_param"]["*"], expected, atol=0, rtol=0)
    for path in (files["embedding"], files["embedding_pt"]):
        pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd_dir), safety_checker=None)
        pipe.load_textual_inversion(str(path), token="teapot")
        token_id = pipe.tokenizer.convert_tokens_to_ids("teapot")
        row = pipe.text_encoder.get_input_embeddings().weight[token_id]
        torch.testing.assert_close(row.detach(), artifact.v_star, atol=0, rtol=0)


def test_kohya_header_metadata_are_strings_with_rank_alpha_and_concept(artifact, tmp_path):
    files = artifact.export_kohya(tmp_path, "teapot", alpha=2.0, prediction_type="epsilon", resolution=32)
    with safe_open(str(files["lora"]), framework="pt") as f:
        meta = f.metadata()
    assert all(isinstance(v, str) for v in meta.values())
    assert meta["ss_network_module"] == "networks.lora"
    assert meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == 2.0
    assert meta["modelspec.sai_model_spec"] == "1.0.0" and meta["modelspec.title"] == "teapot"
    assert meta["modelspec.architecture"].endswith("/lora") and meta["modelspec.resolution"] == "32x32"
    assert meta["tuning_encoder.placeholder"] == "<s*>" and meta["tuning_encoder.nearest_token"] == "dog</w>"
    assert meta["tuning_encoder.method"] == "date" and meta["ss_steps"] == "12"
    assert meta["tuning_encoder.fingerprint"] == artifact.fingerprint and meta["tuning_encoder.version"] != ""


@pytest.mark.parametrize(
    ("width", "prediction", "kohya", "arch"),
    [
        (768, "epsilon", "sd_v1", "stable-diffusion-v1"),
        (1024, "epsilon", "sd_v2", "stable-diffusion-v2-512"),
        (1024, "v_prediction", "sd_v2_v", "stable-diffusion-v2-768-v"),
        (32, "epsilon", "unknown", "unknown"),
    ],
)
def test_model_family_labels(width, prediction, kohya, arch):
    assert model_family(width, prediction) == (kohya, arch)


def test_kohya_names_follow_the_module_path():
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"
    assert kohya_unet_name(path) == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
