"""Mixed precision, reduced-precision frozen weights, weight variants and the hub cache, memory options."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback

from datamodules.pretrain import PretrainDataModule
from lightning_modules import EncoderPretraining
from models.backbone import DiffusionBackbone
from models.hub import ModelNotAvailableError, resolve_model_path
from models.tiny import build_tiny_pipeline
from tests.cli_runs import fit, pretrain_args, tune_args

# bf16 keeps 8 mantissa bits (relative rounding 2^-8 = 0.4 % per op); through the tiny UNet the step-0 losses of
# a bf16-mixed and a float32 run differed by < 1 % (measured, see the assertion messages); 5 % leaves margin.
BF16_RTOL = 0.05


class RecordLosses(Callback):
    """Every logged ``train/loss*`` value of every step, and the dtypes seen at the start of training."""

    def __init__(self) -> None:
        self.steps: list[dict[str, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.backbone_dtypes = {p.dtype for p in pl_module.backbone.parameters()}
        self.trainable_dtypes = {p.dtype for p in pl_module.parameters() if p.requires_grad}
        self.unet_out: list[torch.dtype] = []
        pl_module.backbone.unet.register_forward_hook(
            lambda m, a, out: self.unet_out.append(out.sample.dtype)
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.steps.append({k: float(v) for k, v in metrics.items() if k.startswith("train/loss")})


def _run_pretrain(root, sd, index, precision: str, model: dict | None = None, steps: int = 2):
    rec = RecordLosses()
    fit(
        pretrain_args(root, sd, index, steps=steps, checkpoint_every=steps, precision=precision, model=model),
        rec,
    )
    return rec


def _assert_close(a: dict[str, float], b: dict[str, float], rtol: float) -> None:
    assert a.keys() == b.keys()
    for name in a:
        print(
            f"{name}: {a[name]:.6g} vs fp32 {b[name]:.6g} (rel {abs(a[name] - b[name]) / abs(b[name]):.2e})"
        )
        assert abs(a[name] - b[name]) <= rtol * abs(b[name]), (name, a[name], b[name])


@pytest.fixture(scope="module")
def fp32_pretrain(tiny_sd_dir, index_dir, tmp_path_factory):
    return _run_pretrain(tmp_path_factory.mktemp("fp32"), tiny_sd_dir, index_dir, "32-true")


def test_bf16_mixed_pretraining_and_tuning_match_fp32(fp32_pretrain, tiny_sd_dir, index_dir, tmp_path):
    # 16-mixed cannot run here: on CPU Lightning replaces it by bf16-mixed ("AMP with fp16 is not supported on
    # CPU"). float16 autocast arithmetic is covered by the fp16-variant test below, on torch.autocast directly.
    precision = "bf16-mixed"
    rec = _run_pretrain(tmp_path / "pre", tiny_sd_dir, index_dir, precision)
    assert set(rec.unet_out) == {torch.bfloat16}  # autocast really ran the UNet in reduced precision
    assert rec.trainable_dtypes == {torch.float32}
    assert len(rec.steps) == 2 and "train/loss/nn_contrastive" in rec.steps[0]
    for step in rec.steps:
        assert all(torch.isfinite(torch.tensor(v)) for v in step.values()), step
    # Same seed, same initial weights, same batch and noise: step 0 differs only by the arithmetic precision.
    _assert_close(rec.steps[0], fp32_pretrain.steps[0], BF16_RTOL)

    ckpt = tmp_path / "pre" / "ckpt" / "last.ckpt"
    tuned = {}
    for p in ("32-true", precision):
        tune_rec = RecordLosses()
        fit(tune_args(tmp_path / f"tune_{p}", tiny_sd_dir, index_dir, ckpt, steps=2, precision=p), tune_rec)
        assert all(torch.isfinite(torch.tensor(v)) for s in tune_rec.steps for v in s.values())
        tuned[p] = tune_rec.steps[0]
    assert "train/loss/nn_pull" in tuned[precision]
    _assert_close(tuned[precision], tuned["32-true"], BF16_RTOL)


def test_frozen_backbone_in_bf16_trainables_fp32(fp32_pretrain, tiny_sd_dir, index_dir, tmp_path):
    rec = _run_pretrain(tmp_path, tiny_sd_dir, index_dir, "bf16-mixed", model={"torch_dtype": "bfloat16"})
    assert rec.backbone_dtypes == {torch.bfloat16}
    assert rec.trainable_dtypes == {torch.float32}
    assert all(torch.isfinite(torch.tensor(v)) for s in rec.steps for v in s.values())
    # bf16 weights round the frozen model itself as well: a looser bound than autocast alone.
    _assert_close(rec.steps[0], fp32_pretrain.steps[0], 2 * BF16_RTOL)
    ckpt = torch.load(tmp_path / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    state = ckpt["state_dict"]
    assert state and not any(k.startswith("backbone.") for k in state)
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float32}
    # Cast from the same float32 files: one fingerprint, so a float32 tuning run accepts this checkpoint.
    fp32 = DiffusionBackbone.from_pretrained(str(tiny_sd_dir), str(tiny_sd_dir))
    assert ckpt["tuning_encoder"]["fingerprint"] == fp32.fingerprint()


@pytest.fixture(scope="module")
def fp16_variant_dir(tmp_path_factory) -> Path:
    """The tiny pipeline in float16, saved as the ``fp16`` variant only (``*.fp16.safetensors``)."""
    out = tmp_path_factory.mktemp("fp16") / "tiny-sd-fp16"
    build_tiny_pipeline().to(torch.float16).save_pretrained(out, variant="fp16", safe_serialization=True)
    assert list(out.glob("unet/*.fp16.safetensors")) and not list(out.glob("unet/*model.safetensors"))
    return out


def test_fp16_variant_folder_loads_and_steps_under_fp16_autocast(fp16_variant_dir, tiny_personalizer_config):
    with pytest.raises(OSError):  # the plain files are absent: only the variant can load
        DiffusionBackbone.from_pretrained(str(fp16_variant_dir), str(fp16_variant_dir))
    module = EncoderPretraining(
        pretrained_model_name_or_path=str(fp16_variant_dir),
        image_encoder_name_or_path=str(fp16_variant_dir),
        personalizer=tiny_personalizer_config,
        torch_dtype="float16",
        variant="fp16",
        token_index_mode="torch",
        token_index_cache=None,
    )
    assert {p.dtype for p in module.backbone.parameters()} == {torch.float16}
    assert {p.dtype for p in module.personalizer.parameters()} == {torch.float32}
    module.setup("fit")
    batch = PretrainDataModule(synthetic_concepts=8, synthetic_holdout=1, batch_size=4).probe_batch(4)
    # float16 weights go with 16-mixed (bf16 autocast feeds bf16 activations to float16 norms: a dtype error).
    with torch.autocast("cpu", dtype=torch.float16):
        losses, _ = module.model_step(batch)
    assert losses["loss"].dtype == torch.float32 and torch.isfinite(losses["loss"])
    losses["loss"].backward()
    grads = [p.grad for p in module.personalizer.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def _fake_hub_cache(cache: Path, repo: str, folder: Path) -> Path:
    """The huggingface_hub cache layout (refs/main -> snapshots/<commit>/...) holding a copy of ``folder``."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    return snapshot


def test_hub_cache_lookup_is_variant_aware(fp16_variant_dir, tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    fp16_snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-sd-fp16", fp16_variant_dir)
    fp32_snapshot = _fake_hub_cache(tmp_path / "hub", "tiny-org/tiny-sd", tiny_sd_dir)

    assert Path(resolve_model_path("tiny-org/tiny-sd-fp16", variant="fp16")) == fp16_snapshot
    with pytest.raises(ModelNotAvailableError, match=r"cached, but not with plain .*unet"):
        resolve_model_path("tiny-org/tiny-sd-fp16")  # only fp16 files: a float32 load would fail
    assert Path(resolve_model_path("tiny-org/tiny-sd")) == fp32_snapshot
    with pytest.raises(ModelNotAvailableError, match=r"cached, but not with 'fp16' weights"):
        resolve_model_path("tiny-org/tiny-sd", variant="fp16")
    assert Path(resolve_model_path("tiny-org/tiny-sd", variant="fp16", accept_plain=True)) == fp32_snapshot

    bb = DiffusionBackbone.from_pretrained(
        "tiny-org/tiny-sd-fp16", "tiny-org/tiny-sd-fp16", variant="fp16", torch_dtype=torch.float16
    )
    assert bb.unet.dtype == torch.float16 and bb.image_encoder.dtype == torch.float16
    # The image encoder falls back to plain files when its folder has no such variant.
    bb = DiffusionBackbone.from_pretrained("tiny-org/tiny-sd-fp16", "tiny-org/tiny-sd", variant="fp16")
    assert bb.unet.dtype == torch.float32  # fp16 files, loaded at the default dtype


def _grads_and_loss(module: EncoderPretraining, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad()
    losses, _ = module.model_step(batch)
    losses["loss"].backward()
    return losses["loss"].item(), {
        n: p.grad.clone() for n, p in module.personalizer.named_parameters() if p.grad is not None
    }


def test_gradient_checkpointing_gives_equal_loss_and_grads(tiny_sd_dir, tiny_personalizer_config):
    kw = dict(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        personalizer=tiny_personalizer_config,
        token_index_mode="torch",
        token_index_cache=None,
        seed=3,
    )
    plain, ckpt = EncoderPretraining(**kw), EncoderPretraining(gradient_checkpointing=True, **kw)
    assert ckpt.backbone.unet.is_gradient_checkpointing and not plain.backbone.unet.is_gradient_checkpointing
    batch = PretrainDataModule(synthetic_concepts=8, synthetic_holdout=1, batch_size=4).probe_batch(4)
    results = {}
    for name, module in (("plain", plain), ("ckpt", ckpt)):
        module.setup("fit")
        results[name] = _grads_and_loss(module, batch)
    (loss_a, grads_a), (loss_b, grads_b) = results["plain"], results["ckpt"]
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], rtol=1e-5, atol=1e-7, msg=n)


def test_probe_uses_real_seeded_noise(tiny_sd_dir, tiny_personalizer_config):
    module = EncoderPretraining(
        pretrained_model_name_or_path=str(tiny_sd_dir),
        image_encoder_name_or_path=str(tiny_sd_dir),
        personalizer=tiny_personalizer_config,
        token_index_cache=None,
    )
    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = module.probe_noised(latents), module.probe_noised(latents)
    assert torch.equal(a.noisy, b.noisy)  # the same draw at every probe
    sched = module.backbone.scheduler
    t = sched.config.num_train_timesteps // 2
    assert bool((a.timesteps == t).all())
    ab = sched.alphas_cumprod[t]
    eps = (a.noisy - ab.sqrt() * latents) / (1 - ab).sqrt()
    assert torch.allclose(eps, a.noise, atol=1e-5)
    assert 0.8 < float(eps.std()) < 1.2  # real unit Gaussian noise, not zeros


# ----- InfoNCE across 2 gloo processes == 1 process with the whole batch -----
def _contrastive_inputs():
    g = torch.Generator().manual_seed(0)
    v = torch.randn(8, 16, generator=g, dtype=torch.float64)
    n = torch.randn(8, 2, 16, generator=g, dtype=torch.float64)
    ids = torch.arange(16).reshape(8, 2)
    ids[5, 1] = ids[0, 0]  # a shared neighbour token across the two halves (false-negative masking)
    concepts = torch.tensor([0, 1, 2, 3, 0, 4, 5, 1])  # concepts 0 and 1 appear on both ranks
    return v, n, ids, concepts


def _contrastive_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from losses import NearestNeighbourContrastiveLoss

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        v, n, ids, concepts = _contrastive_inputs()
        rows = slice(rank * 4, rank * 4 + 4)
        local = v[rows].clone().requires_grad_(True)
        loss = NearestNeighbourContrastiveLoss(temperature=0.1)(local, n[rows], ids[rows], concepts[rows])
        loss["loss/nn_contrastive"].backward()
        torch.save({"loss": loss["loss/nn_contrastive"].detach(), "grad": local.grad}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_contrastive_negatives_gathered_across_two_gloo_ranks_equal_one_process(tmp_path):
    from losses import NearestNeighbourContrastiveLoss

    v, n, ids, concepts = _contrastive_inputs()
    full_v = v.clone().requires_grad_(True)
    full = NearestNeighbourContrastiveLoss(temperature=0.1)(full_v, n, ids, concepts)["loss/nn_contrastive"]
    full.backward()

    torch.multiprocessing.spawn(
        _contrastive_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    # DDP averages the ranks' losses and gradients: the mean over ranks is the one-process value.
    torch.testing.assert_close(
        (ranks[0]["loss"] + ranks[1]["loss"]) / 2, full.detach(), rtol=1e-10, atol=1e-12
    )
    grads = torch.cat([r["grad"] for r in ranks]) / 2
    torch.testing.assert_close(grads, full_v.grad, rtol=1e-9, atol=1e-12)


def test_contrastive_rows_of_one_concept_are_not_negatives():
    from losses import NearestNeighbourContrastiveLoss

    g = torch.Generator().manual_seed(2)
    v = torch.nn.functional.normalize(torch.randn(3, 8, generator=g, dtype=torch.float64), dim=-1)
    n = torch.nn.functional.normalize(torch.randn(3, 1, 8, generator=g, dtype=torch.float64), dim=-1)
    tau = 0.2
    out = NearestNeighbourContrastiveLoss(temperature=tau)(v, n, concept_ids=torch.tensor([7, 7, 9]))

    def term(i: int, negatives: list[torch.Tensor]) -> torch.Tensor:
        pos = torch.exp(v[i] @ n[i, 0] / tau)
        return -torch.log(pos / (pos + sum(torch.exp(v[i] @ x / tau) for x in negatives)))

    # Rows 0 and 1 are two views of concept 7: neither is a negative of the other, row 2 is of both.
    expected = (
        term(0, [v[2], n[2, 0]]) + term(1, [v[2], n[2, 0]]) + term(2, [v[0], n[0, 0], v[1], n[1, 0]])
    ) / 3
    assert abs(out["loss/nn_contrastive"].item() - expected.item()) < 1e-9
    with pytest.raises(ValueError, match="2 concepts.*1 distinct"):
        NearestNeighbourContrastiveLoss()(v, n, concept_ids=torch.tensor([1, 1, 1]))


def test_contrastive_is_float32_under_bf16_autocast():
    from losses import NearestNeighbourContrastiveLoss

    g = torch.Generator().manual_seed(4)
    v, n = torch.randn(4, 16, generator=g), torch.randn(4, 1, 16, generator=g)
    ref = NearestNeighbourContrastiveLoss()(v, n)["loss/nn_contrastive"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = NearestNeighbourContrastiveLoss()(v.bfloat16(), n.bfloat16())["loss/nn_contrastive"]
    assert out.dtype == torch.float32
    assert abs(out.item() - ref.item()) <= 0.02 * ref.item()  # only the bf16 rounding of the inputs remains


def test_averaged_initial_v_star_has_the_token_norm(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path):
    from tests.cli_runs import Snapshot

    snap = Snapshot()
    cli = fit(tune_args(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=1), snap)
    embedder = cli.model.personalizer.token_embedder
    assert embedder.rescale and cli.model.init_noise_draws > 1
    norm = snap.params["v_star"].norm(dim=-1)
    torch.testing.assert_close(norm, embedder.target_norm.expand_as(norm), rtol=1e-5, atol=0)


def test_default_num_workers_leaves_a_core_and_caps_at_8(monkeypatch):
    from datamodules.pretrain import default_num_workers

    for cores, expected in ((1, 0), (2, 1), (16, 8), (None, 0)):
        monkeypatch.setattr("os.cpu_count", lambda c=cores: c)
        assert default_num_workers() == expected
    dm = PretrainDataModule(synthetic_concepts=8, synthetic_holdout=1, num_workers=None)
    assert dm.num_workers == default_num_workers()
