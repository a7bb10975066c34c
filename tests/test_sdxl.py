"""DATE on Stable Diffusion XL, offline on the tiny SDXL: the backbone and the modules built on it. Parity with
diffusers' SDXL pipeline (text encoding, UNet, the dual path's extremes), the two text encoders' v*, the
hypernetwork over every attention layer, the nearest word over both tables, and loading (SD vs SDXL, an fp16
variant folder, ``models.tiny`` from the SDXL config). Every phase through train.py and the exports:
``test_sdxl_training.py``; the shared ``sdxl_dir`` and ``sdxl`` fixtures: ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.models.attention import BasicTransformerBlock

from models.attention import LoraDelta
from models.backbone import DiffusionBackbone
from models.backbone_sdxl import SDXLDiffusionBackbone, is_sdxl
from models.encoder import MultiTokenEmbedder
from models.loading import load_backbone
from models.personalizer import Personalizer

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a dog", "a red cat on the beach"]


@pytest.fixture(scope="module")
def pipe(sdxl_dir) -> StableDiffusionXLPipeline:
    return StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))


def _time_ids(n: int, res: int) -> torch.Tensor:
    return torch.tensor([[res, res, 0, 0, res, res]] * n, dtype=torch.float32)


def test_tiny_sdxl_is_a_plain_diffusers_sdxl_pipeline(sdxl_dir, pipe, tiny_sd_dir):
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    assert pipe.unet.config.addition_embed_type == "text_time"
    cfg = pipe.unet.config
    assert cfg.projection_class_embeddings_input_dim == 6 * cfg.addition_time_embed_dim + (
        pipe.text_encoder_2.config.projection_dim
    )
    assert (
        cfg.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    images = pipe("a photo of a dog", num_inference_steps=2, height=32, width=32, output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert is_sdxl(str(sdxl_dir)) and not is_sdxl(str(tiny_sd_dir))


def test_backbone_matches_the_pipeline_text_encoding_and_unet(sdxl, pipe):
    assert type(sdxl) is SDXLDiffusionBackbone and sdxl.resolution == 32
    assert all(not p.requires_grad for p in sdxl.parameters())
    assert sdxl.token_dims == (32, 48) and sdxl.token_dim == 80
    assert sdxl.placeholder_id == 49408 == sdxl.tokenizer_2.convert_tokens_to_ids("<s*>")
    with torch.no_grad():
        ref, neg, ref_pooled, neg_pooled = pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=True)
        ids = sdxl.tokenize(PROMPTS)
        assert ids.shape == (2, 2, 77) and not torch.equal(ids[:, 0], ids[:, 1])  # pads differ: "!" vs eos
        cond = sdxl.conditioning(ids)
        assert torch.equal(cond.context, ref) and torch.equal(cond.pooled, ref_pooled)
        uncond = sdxl.unconditional(2)
        assert torch.equal(uncond.context, neg) and torch.equal(uncond.pooled, neg_pooled)
        x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 700])
        added = {"text_embeds": ref_pooled, "time_ids": _time_ids(2, 32)}
        plain = pipe.unet(x, t, encoder_hidden_states=ref, added_cond_kwargs=added).sample
        assert torch.equal(sdxl.denoise(x, t, cond), plain)
        # v* = the two table rows of "dog" gives exactly the prompt with "dog" (both encoders injected)
        dog = sdxl.tokenizer("dog", add_special_tokens=False).input_ids[0]
        v = sdxl.token_embedding_table()[dog].unsqueeze(0)
        soft = sdxl.conditioning(sdxl.tokenize(["a photo of a <s*>"]), v)
        assert torch.allclose(soft.context, ref[:1], atol=1e-6) and torch.allclose(
            soft.pooled, ref_pooled[:1], atol=1e-6
        )


def test_dual_path_extremes_equal_the_plain_unet_on_soft_and_hard_prompts(sdxl, pipe):
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 4, 16, 16, generator=g), torch.tensor([400])
    ids = sdxl.tokenize(["a photo of a <s*>"])
    dog = torch.tensor([sdxl.tokenizer("dog", add_special_tokens=False).input_ids[0]])
    v = torch.randn(1, sdxl.token_dim, generator=g) * 0.1
    lora = {}
    for name in list(sdxl.unet.attn_processors)[:4]:
        layer = sdxl.unet.get_submodule(name.removesuffix(".processor")).to_q
        lora[name.removesuffix(".processor") + ".to_q"] = LoraDelta(
            torch.randn(2, layer.in_features, generator=g),
            torch.randn(1, 2, 2, generator=g),
            torch.randn(layer.out_features, 2, generator=g),
        )
    with torch.no_grad():
        ctx, _, pooled, _ = pipe.encode_prompt(["a photo of a dog"], do_classifier_free_guidance=False)
        hard = pipe.unet(
            x,
            t,
            encoder_hidden_states=ctx,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": _time_ids(1, 32)},
        ).sample
        out0 = sdxl.personalized_unet(x, t, ids, v, lora, alpha=0.0, hard_token_ids=dog)
        assert torch.allclose(out0, hard, atol=1e-5)
        soft = sdxl.conditioning(ids, v)
        plain_soft = pipe.unet(
            x,
            t,
            encoder_hidden_states=soft.context,
            added_cond_kwargs={"text_embeds": soft.pooled, "time_ids": _time_ids(1, 32)},
        ).sample
        assert torch.allclose(sdxl.personalized_unet(x, t, ids, v, None, alpha=1.0), plain_soft, atol=1e-5)
        half = sdxl.personalized_unet(x, t, ids, v, lora, alpha=0.5, hard_token_ids=dog)
        assert not torch.allclose(half, hard, atol=1e-4) and torch.isfinite(half).all()


def test_hypernetwork_covers_every_attention_layer_and_v_star_has_one_head_per_encoder(
    sdxl, tiny_personalizer_config
):
    p = Personalizer(sdxl, tiny_personalizer_config)
    blocks = [m for m in sdxl.unet.modules() if isinstance(m, BasicTransformerBlock)]
    assert len(blocks) == 2 * 2 + 3 * 2 + 2  # down: 2 attentions x 2 layers, up: 3 x 2, mid: 2 (as SDXL)
    assert len(p.hypernetwork.names) == len(blocks) * 2 * 4  # attn1 + attn2, q/k/v/out
    emb = p.token_embedder
    assert isinstance(emb, MultiTokenEmbedder) and emb.token_dims == sdxl.token_dims
    v = emb(torch.randn(3, tiny_personalizer_config.feature_dim))
    norms = [part.norm(dim=-1) for part in torch.split(v, list(sdxl.token_dims), dim=-1)]
    for n, target in zip(norms, sdxl.mean_token_norms()):
        assert torch.allclose(n, torch.full_like(n, target), rtol=1e-5)
    assert sdxl.mean_token_norms()[0] != pytest.approx(sdxl.mean_token_norms()[1])


def test_nearest_word_maximises_the_sum_of_both_cosines(sdxl):
    index = sdxl.build_token_index("exact", None)
    table = sdxl.token_embedding_table().detach()
    e_l, e_g = torch.split(table, list(sdxl.token_dims), dim=1)
    ids = [sdxl.tokenizer(w, add_special_tokens=False).input_ids[0] for w in ("dog", "cat", "house", "tree")]
    # v_l is "dog"'s row, v_g "cat"'s: the two encoders disagree
    g = torch.Generator().manual_seed(3)
    queries = torch.stack(
        [torch.cat([e_l[ids[0]], e_g[ids[1]]]), torch.cat([e_l[ids[2]] + e_l[ids[3]], e_g[ids[3]]])]
    )
    queries = queries + 0.01 * torch.randn(queries.shape, generator=g)
    q_l, q_g = torch.split(queries, list(sdxl.token_dims), dim=1)
    cos = lambda q, e: torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T  # noqa: E731
    score = cos(q_l, e_l) + cos(q_g, e_g)
    score[:, sdxl.special_token_ids()[: sum(i < table.shape[0] for i in sdxl.special_token_ids())]] = -9
    best = score.topk(3, dim=-1)
    result = index.search(queries, 3)
    assert torch.equal(result.ids, best.indices)
    assert torch.allclose(result.scores, best.values / 2, atol=1e-5)
    # the regulariser's similarity is the same one
    nn_cos = torch.nn.functional.cosine_similarity(
        sdxl.similarity_space(queries), sdxl.similarity_space(table[result.ids[:, 0]])
    )
    assert torch.allclose(nn_cos, best.values[:, 0] / 2, atol=1e-5)


def test_sd_path_still_loads_the_sd_backbone(tiny_sd_dir):
    assert type(load_backbone(str(tiny_sd_dir), str(tiny_sd_dir))) is DiffusionBackbone


def test_sdxl_loads_an_fp16_variant_folder(tmp_path):
    from models.tiny_sdxl import build_tiny_sdxl_pipeline

    folder = tmp_path / "tiny-sdxl-fp16"
    build_tiny_sdxl_pipeline().to(torch.float16).save_pretrained(
        folder, variant="fp16", safe_serialization=True
    )
    assert not list(folder.glob("unet/*[!6].safetensors"))  # the fp16 files only
    bb = load_backbone(str(folder), str(folder), variant="fp16")
    assert type(bb) is SDXLDiffusionBackbone
    assert bb.unet.dtype == torch.float32 and bb.text_encoder_2.dtype == torch.float32  # cast on load


def test_models_tiny_builds_the_tiny_sdxl_from_its_config(tmp_path, capsys):
    from models.tiny import build_tiny_pipeline, main

    config = REPO / "configs" / "backbone" / "tiny_sdxl.yaml"
    main([str(tmp_path / "x"), "--config", str(config)])
    assert "models.tiny_sdxl" in capsys.readouterr().out
    assert is_sdxl(str(tmp_path / "x"))
    with pytest.raises(ValueError, match="models.tiny_sdxl"):
        build_tiny_pipeline(config)
