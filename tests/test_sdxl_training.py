"""DATE on Stable Diffusion XL through train.py, offline on the tiny SDXL: pretraining moves both token heads and
the hypernetwork only, tuning exports an artefact with both encoders' parts, training steps gather token rows without
concatenating the table, the exports (diffusers and kohya layouts) loaded by plain ``StableDiffusionXLPipeline``
sample as the single path, and the evaluation runs. The backbone and modules themselves: ``test_sdxl.py``; the
shared ``sdxl_dir`` and ``sdxl`` fixtures: ``conftest.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from lightning.pytorch.callbacks import Callback
from safetensors.torch import load_file

from models.artifact import ConceptArtifact
from models.backbone_sdxl import SDXLDiffusionBackbone
from models.sampling import sample_personalized
from tests.cli_runs import Snapshot, _overlay, _trainer, assert_backbone_unchanged, fit, moved

REPO = Path(__file__).resolve().parents[1]
PRETRAIN = REPO / "configs" / "pretrain" / "tiny_sdxl.yaml"
TUNE = REPO / "configs" / "tune" / "tiny_sdxl.yaml"


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
