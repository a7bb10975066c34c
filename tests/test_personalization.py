"""Dual-path attention, hypernetwork and placeholder injection: parity with the plain UNet and gradient flow."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from models.attention import DualPathAttnProcessor, Personalization, attention_module_names
from models.personalizer import Personalizer


@pytest.fixture(scope="module")
def plain_unet(tiny_sd_dir):
    unet = UNet2DConditionModel.from_pretrained(str(tiny_sd_dir), subfolder="unet")
    unet.set_attn_processor(AttnProcessor2_0())
    return unet.eval()


@pytest.fixture()
def inputs(backbone):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    timesteps = torch.tensor([10, 700])
    clip = torch.randn(2, 3, 32, 32, generator=g)
    ids = backbone.tokenize(["a photo of a <s*>", "a <s*> on the beach"], require_placeholder=True)
    hard_ids = backbone.tokenize(["a photo of a dog", "a cat on the beach"])
    hard_tokens = torch.tensor([1929, 2368])  # "dog</w>", "cat</w>"
    return latents, timesteps, clip, ids, hard_ids, hard_tokens


@pytest.fixture()
def personalizer(backbone, tiny_personalizer_config):
    torch.manual_seed(0)
    return Personalizer(backbone, tiny_personalizer_config)


def _predict(personalizer, backbone, latents, timesteps, clip):
    empty = backbone.encode_text(backbone.tokenize([""]))
    return personalizer.predict(backbone, clip, latents, timesteps, empty)


def test_processors_sit_on_every_attention_layer(backbone):
    procs = backbone.unet.attn_processors
    n_attention = sum(1 for _, m in backbone.unet.named_modules() if m.__class__.__name__ == "Attention")
    assert len(procs) == n_attention > 0
    assert all(isinstance(p, DualPathAttnProcessor) for p in procs.values())
    names = attention_module_names(backbone.unet)
    assert {n.rsplit(".", 1)[-1] for n in names} == {"attn1", "attn2"}
    assert [p.name for p in procs.values()] == names


def test_text_encoding_matches_clip_text_model(backbone, inputs):
    hard_ids = inputs[4]
    with torch.no_grad():
        ref = backbone.text_encoder(hard_ids).last_hidden_state
        assert torch.equal(backbone.encode_text(hard_ids), ref)


def test_soft_prompt_injects_v_star_per_sample(backbone, inputs):
    ids = inputs[3]
    v = torch.randn(2, backbone.token_dim)
    with torch.no_grad():
        a = backbone.encode_text(ids, v)
        b = backbone.encode_text(ids, torch.stack([v[0], -v[1]]))
    # sample 0 is unchanged, sample 1 differs only from the placeholder position on (causal attention)
    assert torch.equal(a[0], b[0])
    pos = int((ids[1] == backbone.placeholder_id).nonzero()[0])
    assert torch.equal(a[1, :pos], b[1, :pos]) and not torch.allclose(a[1, pos:], b[1, pos:])
    with pytest.raises(ValueError, match="no placeholder embedding"):
        backbone.encode_text(ids)


def test_parity_alpha_one_equals_plain_unet_on_soft_prompt(backbone, personalizer, plain_unet, inputs):
    latents, timesteps, clip, ids, _, hard_tokens = inputs
    with torch.no_grad():
        pred = _predict(personalizer, backbone, latents, timesteps, clip)
        assert torch.count_nonzero(pred.cores) == 0  # zero-initialised heads
        out = backbone.personalized_unet(
            latents, timesteps, ids, pred.v_star, personalizer.deltas(pred.cores), 1.0
        )
        soft = backbone.encode_text(ids, pred.v_star)
        ref = plain_unet(latents, timesteps, encoder_hidden_states=soft).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_parity_alpha_zero_equals_plain_unet_on_hard_prompt(backbone, personalizer, plain_unet, inputs):
    latents, timesteps, clip, ids, hard_ids, hard_tokens = inputs
    # even with non-zero LoRA deltas the vanilla path ignores them
    with torch.no_grad():
        personalizer.hypernetwork.heads.bias.normal_()
        pred = _predict(personalizer, backbone, latents, timesteps, clip)
        out = backbone.personalized_unet(
            latents, timesteps, ids, pred.v_star, personalizer.deltas(pred.cores), 0.0, hard_tokens
        )
        ref = plain_unet(latents, timesteps, encoder_hidden_states=backbone.text_encoder(hard_ids)[0]).sample
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_nonzero_deltas_change_the_adapted_path_and_alpha_blends(backbone, personalizer, inputs):
    latents, timesteps, clip, ids, _, hard_tokens = inputs
    with torch.no_grad():
        personalizer.hypernetwork.heads.bias.normal_()
        pred = _predict(personalizer, backbone, latents, timesteps, clip)
        lora = personalizer.deltas(pred.cores)

        def run(a, lo):
            return backbone.personalized_unet(latents, timesteps, ids, pred.v_star, lo, a, hard_tokens)  # noqa: E731

        assert not torch.allclose(run(1.0, lora), run(1.0, {}), atol=1e-4)
        half, one, zero = run(0.5, lora), run(1.0, lora), run(0.0, lora)
    # attention outputs are blended layer by layer, so the UNet output lies strictly between the two paths
    assert not torch.allclose(half, one, atol=1e-5) and not torch.allclose(half, zero, atol=1e-5)


def test_processors_receive_their_kwargs(backbone, personalizer, inputs, monkeypatch):
    latents, timesteps, clip, ids, _, hard_tokens = inputs
    seen = []
    original = DualPathAttnProcessor.__call__

    def spy(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        personalization=None,
    ):
        seen.append((self.name, personalization))
        return original(
            self, attn, hidden_states, encoder_hidden_states, attention_mask, temb, personalization
        )

    monkeypatch.setattr(DualPathAttnProcessor, "__call__", spy)
    with torch.no_grad():
        pred = _predict(personalizer, backbone, latents, timesteps, clip)
        seen.clear()
        backbone.personalized_unet(
            latents, timesteps, ids, pred.v_star, personalizer.deltas(pred.cores), 0.5, hard_tokens
        )
    names = attention_module_names(backbone.unet)
    assert sorted(n for n, _ in seen) == sorted(names)
    assert all(isinstance(p, Personalization) and p.alpha == 0.5 for _, p in seen)


def _backward(backbone, personalizer, inputs):
    latents, timesteps, clip, ids, _, hard_tokens = inputs
    personalizer.zero_grad(set_to_none=True)
    pred = _predict(personalizer, backbone, latents, timesteps, clip)
    out = backbone.personalized_unet(
        latents, timesteps, ids, pred.v_star, personalizer.deltas(pred.cores), 0.5, hard_tokens
    )
    out.pow(2).mean().backward()
    return {n: p.grad for n, p in personalizer.named_parameters()}


def test_gradients_reach_only_the_trainable_modules(backbone, personalizer, inputs):
    # At initialisation the heads are zero, so only they (not the trunk or the factors A, B) get a gradient
    # on the LoRA side: dL/dA and dL/dB carry a factor M = 0, dL/dtrunk a factor W_head = 0.
    grads = _backward(backbone, personalizer, inputs)
    assert all(p.grad is None for p in backbone.parameters())
    for name, grad in grads.items():
        if name.startswith(("hypernetwork.down", "hypernetwork.up", "hypernetwork.trunk")):
            assert grad is None or torch.count_nonzero(grad) == 0, name
        else:
            assert grad is not None and torch.count_nonzero(grad) > 0, name
    # once the heads are non-zero, every trainable parameter gets a gradient, and still no backbone one
    with torch.no_grad():
        personalizer.hypernetwork.heads.weight.normal_(std=0.1)
    grads = _backward(backbone, personalizer, inputs)
    assert all(p.grad is None for p in backbone.parameters())
    assert all(g is not None and torch.count_nonzero(g) > 0 for g in grads.values()), [
        n for n, g in grads.items() if g is None or torch.count_nonzero(g) == 0
    ]


def test_alpha_out_of_range_and_missing_hard_prompt_are_errors(backbone, inputs):
    with pytest.raises(ValueError, match="alpha"):
        Personalization(alpha=1.5)
    latents, timesteps, _, ids, _, _ = inputs
    with pytest.raises(ValueError, match="hard_token_ids"):
        backbone.personalized_unet(latents, timesteps, ids, torch.zeros(2, backbone.token_dim), None, 0.5)


def test_personalizer_state_dict_round_trip(
    backbone, personalizer, tiny_personalizer_config, inputs, tmp_path
):
    from safetensors.torch import load_file, save_file

    latents, timesteps, clip, *_ = inputs
    with torch.no_grad():
        personalizer.hypernetwork.heads.bias.normal_()
    save_file({k: v.contiguous() for k, v in personalizer.state_dict().items()}, tmp_path / "p.safetensors")
    torch.manual_seed(123)
    other = Personalizer(backbone, tiny_personalizer_config)
    other.load_state_dict(load_file(tmp_path / "p.safetensors"))
    with torch.no_grad():
        a, b = (
            _predict(personalizer, backbone, latents, timesteps, clip),
            _predict(other, backbone, latents, timesteps, clip),
        )
    assert torch.equal(a.v_star, b.v_star) and torch.equal(a.cores, b.cores)
    # no backbone weight leaks into the trainable state
    assert not any(
        k.startswith(("unet", "vae", "text_encoder", "image_encoder")) for k in personalizer.state_dict()
    )


@pytest.mark.parametrize("kind", ["attn1", "attn2"])
def test_one_layer_blends_the_two_paths_exactly(backbone, personalizer, kind):
    # At one attention layer the dual path is alpha * adapted + (1 - alpha) * vanilla, where each path alone is
    # what alpha = 1 and alpha = 0 compute (the blend shares base projections between the paths).
    name = next(n for n in attention_module_names(backbone.unet) if n.endswith(kind))
    attn = backbone.unet.get_submodule(name)
    proc = backbone.unet.attn_processors[f"{name}.processor"]
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 16, attn.to_q.in_features, generator=g)
    soft = torch.randn(2, 77, backbone.token_dim, generator=g) if kind == "attn2" else None
    hard = torch.randn(2, 77, backbone.token_dim, generator=g)
    with torch.no_grad():
        personalizer.hypernetwork.heads.bias.normal_()
        cores = personalizer.hypernetwork(torch.randn(2, personalizer.config.feature_dim, generator=g))
        lora = personalizer.deltas(cores)

        def run(alpha):
            return proc(attn, hidden, soft, personalization=Personalization(lora, hard, alpha))

        adapted, vanilla, half = run(1.0), run(0.0), run(0.5)
    assert not torch.allclose(adapted, vanilla, atol=1e-4)
    torch.testing.assert_close(half, 0.5 * adapted + 0.5 * vanilla, atol=1e-6, rtol=0)
