"""DATE on Stable Diffusion XL, offline on the tiny SDXL: parity with diffusers' SDXL pipeline, the two
text encoders' v*, the nearest word over both tables, every phase through train.py, and the exports loaded by plain
``StableDiffusionXLPipeline``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from diffusers.models.attention import BasicTransformerBlock
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from models.artifact import ConceptArtifact
from models.attention import LoraDelta
from models.backbone import DiffusionBackbone
from models.backbone_sdxl import SDXLDiffusionBackbone, is_sdxl
from models.encoder import MultiTokenEmbedder
from models.loading import load_backbone
from models.personalizer import Personalizer
from models.sampling import sample_personalized
from models.tiny_sdxl import write_tiny_sdxl_backbone
from tests.cli_runs import Snapshot, _overlay, _trainer, assert_backbone_unchanged, fit, moved

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "tiny_sdxl.yaml"
TUNE = REPO / "configs" / "tune" / "tiny_sdxl.yaml"
PROMPTS = ["a photo of a dog", "a red cat on the beach"]


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory) -> Path:
    return write_tiny_sdxl_backbone(tmp_path_factory.mktemp("tiny_sdxl") / "tiny-sdxl")


@pytest.fixture(scope="module")
def sdxl(sdxl_dir) -> SDXLDiffusionBackbone:
    return load_backbone(str(sdxl_dir), str(sdxl_dir))


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


# ----- every phase through train.py, and the exports -----
def _args(
    config: Path, root: Path, sd: Path, index: Path, steps: int, model: dict, data: dict, ckpt_every=None
):
    m = {
        "pretrained_model_name_or_path": str(sd),
        "image_encoder_name_or_path": str(sd),
        "token_index_cache": str(index),
        **model,
    }
    return ["--config", str(config), *_overlay(root, _trainer(root, steps, ckpt_every), m, data)]


@pytest.fixture(scope="module")
def sdxl_pretrained(sdxl_dir, tmp_path_factory):
    root, index = tmp_path_factory.mktemp("sdxl_pretrain"), tmp_path_factory.mktemp("sdxl_index")
    snap = Snapshot()
    cli = fit(
        _args(
            PRETRAIN,
            root,
            sdxl_dir,
            index,
            2,
            {"sample_every_n_steps": 1, "probe_size": 2},
            {"batch_size": 4},
            2,
        ),
        snap,
    )
    return cli.model, snap, root / "ckpt" / "last.ckpt", index


def test_pretraining_on_sdxl_moves_both_token_heads_and_the_hypernetwork_only(sdxl_pretrained):
    model, snap, ckpt, _ = sdxl_pretrained
    assert isinstance(model.backbone, SDXLDiffusionBackbone) and ckpt.is_file()
    changed = moved(model, snap.params)
    for prefix in (
        "personalizer.token_embedder.heads.0.",
        "personalizer.token_embedder.heads.1.",
        "personalizer.hypernetwork.heads.",
    ):
        assert any(n.startswith(prefix) for n in changed), prefix
    assert all(n.startswith("personalizer.") for n in changed)
    assert_backbone_unchanged(model, snap)
    assert not any(k.startswith("backbone.") for k in torch.load(ckpt, weights_only=True)["state_dict"])


@pytest.fixture(scope="module")
def sdxl_tuned(sdxl_dir, sdxl_pretrained, tmp_path_factory):
    _, _, ckpt, index = sdxl_pretrained
    root = tmp_path_factory.mktemp("sdxl_tune")
    opt = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.05, "weight_decay": 0.0}}
    model = {
        "encoder_checkpoint": str(ckpt),
        "export_dir": str(root / "concepts"),
        "optimizer": opt,
        "export_kohya": True,
    }
    snap = Snapshot()
    cli = fit(_args(TUNE, root, sdxl_dir, index, 3, model, {"steps": 3}), snap, TableBuilds())
    return cli.model, snap


class TableBuilds(Callback):
    """Counts the full-table concatenations (``token_embedding_table``) made during training steps."""

    builds = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        build = type(pl_module.backbone).token_embedding_table

        def counted(backbone):
            TableBuilds.builds += 1
            return build(backbone)

        pl_module.backbone.token_embedding_table = counted.__get__(pl_module.backbone)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        del pl_module.backbone.token_embedding_table


def test_sdxl_training_steps_gather_token_rows_without_concatenating_the_table(sdxl, sdxl_tuned):
    assert (
        TableBuilds.builds == 0
    )  # three tuning steps, each with the nearest-token lookup and the hard prompt
    table, rows = sdxl.token_embedding_table().detach(), sdxl.token_rows()
    ids = torch.tensor([[1, 5], [7, 300]])
    assert rows.shape == table.shape and rows.device == table.device
    assert torch.equal(rows[ids], table[ids]) and torch.equal(rows.detach()[ids[:, 0]], table[ids[:, 0]])


def test_tuning_on_sdxl_exports_an_artefact_with_both_parts(sdxl_tuned):
    model, snap = sdxl_tuned
    assert moved(model, snap.params) == {"v_star", "cores"}
    art = ConceptArtifact.load(model.artifact_path)
    assert art.embedding_parts() == {"clip_l": 32, "clip_g": 48} and art.v_star.shape == (80,)
    assert art.steps == 3 and len(art.lora) == len(model.personalizer.hypernetwork.names)
    emb = load_file(
        str(
            model.artifact_path.with_name(model.artifact_path.stem + "_diffusers")
            / "learned_embeds.safetensors"
        )
    )
    assert (
        set(emb) == {"clip_l", "clip_g"} and emb["clip_l"].shape == (1, 32) and emb["clip_g"].shape == (1, 48)
    )
    assert torch.equal(torch.cat([emb["clip_l"], emb["clip_g"]], dim=1)[0], art.v_star)


def _load_pipe(
    sdxl_dir, lora_path: Path, emb: dict[str, torch.Tensor], token: str
) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.load_lora_weights(str(lora_path))
    pipe.load_textual_inversion(
        emb["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
    )
    pipe.load_textual_inversion(
        emb["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
    )
    return pipe


def test_plain_diffusers_sdxl_loads_the_exports_and_samples_as_the_single_path(sdxl_dir, sdxl_tuned):
    model, _ = sdxl_tuned
    art = ConceptArtifact.load(model.artifact_path)
    folder = model.artifact_path.with_name(model.artifact_path.stem + "_diffusers")
    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(5))
    call = dict(num_inference_steps=3, guidance_scale=3.0, height=32, width=32, output_type="pt")
    pipe = _load_pipe(sdxl_dir, folder, load_file(str(folder / "learned_embeds.safetensors")), "<s*>")
    with torch.no_grad():
        theirs = pipe("a <s*> on the beach", latents=latents.clone(), **call).images
    ours = sample_personalized(
        model.backbone,
        ["a <s*> on the beach"],
        art.v_star.unsqueeze(0),
        art.deltas(),
        alpha=1.0,
        num_inference_steps=3,
        guidance_scale=3.0,
        latents=latents.clone(),
    )
    assert torch.allclose(theirs, ours, atol=2e-3), (theirs - ours).abs().max()
    # the kohya layout (module paths of SDXL's UNet) loads into the same pipeline and gives the same image
    stem = model.artifact_path.stem
    kohya = model.artifact_path.with_name(f"{stem}_kohya")
    meta_pipe = _load_pipe(
        sdxl_dir, kohya / f"{stem}_lora.safetensors", load_file(str(kohya / f"{stem}.safetensors")), stem
    )
    with torch.no_grad():
        via_kohya = meta_pipe(f"a {stem} on the beach", latents=latents.clone(), **call).images
    assert torch.allclose(via_kohya, theirs, atol=1e-4)
    plain = StableDiffusionXLPipeline.from_pretrained(str(sdxl_dir))
    plain.scheduler = DDIMScheduler.from_config(plain.scheduler.config)
    with torch.no_grad():
        base = plain("a dog on the beach", latents=latents.clone(), **call).images
    assert not torch.allclose(base, theirs, atol=1e-3)


def test_sd_path_still_loads_the_sd_backbone(tiny_sd_dir):
    assert type(load_backbone(str(tiny_sd_dir), str(tiny_sd_dir))) is DiffusionBackbone


def test_evaluation_runs_on_the_tiny_sdxl(sdxl_dir, sdxl_pretrained, tmp_path):
    import evaluate
    from evaluation.metrics.tiny_models import write_tiny_eval_models

    _, _, ckpt, _ = sdxl_pretrained
    out = tmp_path / "eval"
    write_tiny_eval_models(tmp_path / "metrics")
    argv = [
        "run",
        "--config",
        str(REPO / "configs" / "evaluate" / "tiny_sdxl.yaml"),
        "--pretrained_model_name_or_path",
        str(sdxl_dir),
        "--image_encoder_name_or_path",
        str(sdxl_dir),
        "--encoder_checkpoint",
        str(ckpt),
        "--metrics.tiny_models_dir",
        str(tmp_path / "metrics"),
        "--tune_overrides",
        '{"model.init_args.token_index_cache": null, "data.init_args.batch_size": 2}',
        "--concepts.synthetic_ids",
        "[60]",
        "--concepts.prompts",
        '["a <s*> on the beach"]',
        "--methods",
        '[{"name": "date"}]',
        "--sweep.steps",
        "[0, 1]",
        "--sweep.alphas",
        "[0.5, 1.0]",
        "--sampling.num_inference_steps",
        "2",
        "--bootstrap_samples",
        "50",
        "--grids",
        "false",
        "--progress",
        "false",
        "--out_dir",
        str(out),
    ]
    result = evaluate.main(argv)
    assert result.n_rows == 4  # 2 steps x 2 alphas x 1 prompt x 1 sample
    assert (out / "results.csv").is_file()


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
