"""The training loop's own defects on a GPU-shaped run: noise under gradient accumulation, NaN on one rank,
host-device reads per step, sampling after the optimizer step (tiny backbone, CPU)."""

from __future__ import annotations

import socket
import traceback
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.overrides import TorchFunctionMode

import lightning_modules.base as base
import lightning_modules.samples as samples
import train
from lightning_modules import EncoderPretraining
from losses import NearestNeighbourContrastiveLoss
from tests.cli_runs import REPO, fit, load_ckpt, pretrain_args, tune_args
from tests.gloo_workers import nan_on_rank_one


def test_each_micro_batch_of_an_accumulated_step_draws_its_own_noise(
    tiny_sd_dir, index_dir, tmp_path, monkeypatch
):
    draws = []

    def recording(scheduler, latents, generator=None, timesteps=None):
        noised = add_noise(scheduler, latents, generator=generator, timesteps=timesteps)
        draws.append((noised.noise.clone(), noised.timesteps.clone()))
        return noised

    add_noise = base.add_noise
    monkeypatch.setattr(base, "add_noise", recording)
    cli = fit(pretrain_args(tmp_path, tiny_sd_dir, index_dir, steps=2, accumulate_grad_batches=2))
    assert cli.trainer.global_step == 2 and len(draws) == 4  # two optimizer steps of two micro-batches
    for i in range(4):
        for j in range(i):
            assert not torch.equal(draws[i][0], draws[j][0]), (i, j)
    # Without accumulation a step's draw is the one it always was: (seed, global step, rank).
    module = cli.model
    module.trainer.accumulate_grad_batches = 1
    expected = torch.Generator().manual_seed(((module.seed * 1_000_003 + 2) * 65_537) % (2**63))
    assert torch.equal(torch.rand(4, generator=module.step_generator()), torch.rand(4, generator=expected))


def test_samples_are_drawn_after_the_optimizer_step_from_the_values_of_their_step(
    tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path, monkeypatch
):
    inside, calls, used = [False], [], []
    real = samples.sample_personalized

    def recording(backbone, prompts, v_star, *args, **kwargs):
        calls.append(inside[0])
        return real(backbone, prompts, v_star, *args, **kwargs)

    monkeypatch.setattr(samples, "sample_personalized", recording)
    model = {"sample_every_n_steps": 1, "sample_inference_steps": 2}
    cli = train.main(
        tune_args(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=2, model=model), run=False
    )
    module, step = cli.model, cli.model.training_step
    real_log = module.log_samples

    def training_step(*args, **kwargs):
        used.append(module.v_star.detach().clone())
        inside[0] = True
        try:
            return step(*args, **kwargs)
        finally:
            inside[0] = False

    def log_samples(prompts, v_star, cores, tag, step=None, slots=None):
        assert torch.equal(v_star, used[step]) and not torch.equal(v_star, module.v_star)  # before the update
        return real_log(prompts, v_star, cores, tag, step, slots)

    monkeypatch.setattr(module, "training_step", training_step)
    monkeypatch.setattr(module, "log_samples", log_samples)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert calls == [False, False]  # one sample per step, none while a training step's graph is alive
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*"))), {"images": 0}).Reload()
    assert [s.step for s in events.Images("concept/samples")] == [0, 1]


# ----- a NaN on one rank stops every rank, with one message -----
def test_a_nan_on_one_of_two_gloo_ranks_stops_both_with_one_message(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(nan_on_rank_one, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    first, second = ((tmp_path / f"rank{r}.txt").read_text() for r in range(2))
    assert first == second == repr("non-finite loss term(s): rank 1: loss=[nan], loss/diffusion=[nan]")


# ----- reads of tensor values (host-device synchronisations on a GPU) per tuning step -----
# Reads of values, and ops whose output shape depends on the values (CUDA syncs for them). ``numpy()`` is not
# counted: it only works on host tensors (FAISS's results, ids already on the host).
READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "unique", "nonzero"}
READS |= {"masked_select", "argwhere", "unique_consecutive"}


class ReadCounter(TorchFunctionMode, Callback):
    """Records every read of a tensor's value by the project's code between a batch's start and its end (the
    tuning step, the optimizer step and the callbacks), with the line that made it. On a GPU each is a
    host-device synchronisation; here on the CPU the same lines run, so counting them counts those."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[list[str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        masked = name == "__getitem__" and any(getattr(a, "dtype", None) == torch.bool for a in args[1:])
        if (name in READS or masked) and (where := _caller()):
            self.steps[-1].append(f"{name} at {where}")
        return func(*args, **(kwargs or {}))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.steps.append([])
        self.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.__exit__(None, None, None)


def _caller() -> str | None:
    """``file:line function`` of the project's line that made the read (torch's own Python frames skipped, e.g.
    ``Tensor.unique``); None for reads by Lightning or torch themselves (e.g. Adam's step counter, a CPU
    tensor unless ``capturable``)."""
    for frame in traceback.extract_stack()[-3::-1]:
        path = Path(frame.filename)
        if "torch" in path.parts and "site-packages" in path.parts:
            continue
        if REPO in path.parents and ".venv" not in path.parts:
            return f"{path.relative_to(REPO)}:{frame.lineno} {frame.name}"
        return None
    return None


# What a tuning step needs to read: the nearest-token search's round trip (FAISS runs on the host), the loss's
# finite flag (one fused reduction, all-reduced across ranks) and the trained weights' finite flag (one fused
# reduction after the update). Before: 14 reads a step (the index's finiteness and id checks, the placeholder
# mask twice, the concept count, per-term floats of the logged losses, two in the loss's finite check).
SEARCH, LOSS_FLAG, WEIGHT_FLAG = "_search_faiss", "check_finite", "on_train_batch_end"


@pytest.mark.parametrize(
    ("variant", "reads"),
    [(None, [SEARCH, LOSS_FLAG, WEIGHT_FLAG]), ("textual_inversion", [LOSS_FLAG, WEIGHT_FLAG])],
    ids=["date", "textual_inversion"],
)
def test_host_device_reads_per_tuning_step(tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path, variant, reads):
    counter = ReadCounter()
    ckpt = pretrain_ckpt if variant is None else None
    fit(tune_args(tmp_path, tiny_sd_dir, index_dir, ckpt, steps=3, variant=variant), counter)
    assert len(counter.steps) == 3
    for step in counter.steps:
        assert [line.rsplit(" ", 1)[-1] for line in step] == reads, step


# ----- batch 1 keeps the contrastive term: negatives from earlier batches -----
def test_queued_rows_are_the_negatives_they_would_be_in_one_batch():
    g = torch.Generator().manual_seed(0)
    v, n = (
        torch.randn(4, 8, generator=g, dtype=torch.float64),
        torch.randn(4, 2, 8, generator=g, dtype=torch.float64),
    )
    ids, concepts = torch.randint(0, 50, (4, 2), generator=g), torch.tensor([0, 1, 2, 1])
    in_batch = NearestNeighbourContrastiveLoss()(v, n, ids, concepts)["loss/nn_contrastive"]
    alone = []
    for i in range(4):  # each row at batch 1, the other three remembered from earlier batches
        loss = NearestNeighbourContrastiveLoss(queue_size=3, dim=8, k=2).double()
        assert not loss.has_negatives(concepts[i : i + 1])  # empty slots are no negatives
        for j in (j for j in range(4) if j != i):
            loss.remember(v[j : j + 1], n[j : j + 1], ids[j : j + 1], concepts[j : j + 1])
        assert loss.has_negatives(concepts[i : i + 1])
        alone.append(
            loss(v[i : i + 1], n[i : i + 1], ids[i : i + 1], concepts[i : i + 1])["loss/nn_contrastive"]
        )
    torch.testing.assert_close(torch.stack(alone).mean(), in_batch)
    only_itself = NearestNeighbourContrastiveLoss(queue_size=2, dim=8, k=2).double()
    only_itself.remember(v[1:2], n[1:2], ids[1:2], concepts[1:2])
    assert not only_itself.has_negatives(concepts[3:4])  # the queue holds the same concept only


def test_batch_one_with_accumulation_keeps_the_contrastive_term(tiny_sd_dir, index_dir, tmp_path):
    terms = []

    class Terms(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            terms.append(sorted(k for k in trainer.callback_metrics if k.startswith("train/loss/nn")))

    model, data = {"nn_queue": 3}, {"batch_size": 1}
    cli = fit(
        pretrain_args(tmp_path, tiny_sd_dir, index_dir, 2, 2, model, data, accumulate_grad_batches=2), Terms()
    )
    # The first micro-batch has no earlier rows (the pull); every later one contrasts with the queue.
    assert terms[0] == ["train/loss/nn_pull"] and "train/loss/nn_contrastive" in terms[-1]
    state = load_ckpt(tmp_path / "ckpt" / "last.ckpt")["state_dict"]
    assert int(state["nn_loss.queue_next"]) == 4 % 3 and (state["nn_loss.queue_concepts"] >= 0).all()
    assert torch.equal(state["nn_loss.queue_v"], cli.model.nn_loss.queue_v)  # a resume starts from this queue


def test_the_batch_one_sdxl_preset_keeps_the_contrastive_term():
    preset = yaml.safe_load((REPO / "configs" / "pretrain" / "sdxl_24gb.yaml").read_text())
    assert preset["data"]["init_args"]["batch_size"] == 1
    assert preset["model"]["init_args"]["nn_queue"] >= preset["trainer"]["accumulate_grad_batches"] - 1


def test_the_rate_decays_by_global_step_also_when_a_constant_run_is_resumed_with_it(
    tiny_sd_dir, index_dir, tmp_path
):
    """``lr_decay_steps``: a constant-rate run's checkpoint resumed with a decay from its last step (the cool-down
    of a pretrained encoder): every step's rate is the base rate times (end - step) / (end - start)."""
    rates = []

    class Rates(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            rates.append((trainer.global_step, trainer.optimizers[0].param_groups[0]["lr"]))

    fit(pretrain_args(tmp_path, tiny_sd_dir, index_dir, 2, 2), Rates())
    base_rate = rates[0][1]
    assert [s for s, _ in rates] == [0, 1] and all(r == base_rate for _, r in rates)
    rates.clear()
    cli = train.main(
        pretrain_args(tmp_path, tiny_sd_dir, index_dir, 5, model={"lr_decay_steps": [2, 5]}), run=False
    )
    cli.trainer.callbacks.append(Rates())
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert [s for s, _ in rates] == [2, 3, 4]
    for (step, rate), factor in zip(rates, [1.0, 2 / 3, 1 / 3]):
        assert rate == pytest.approx(base_rate * factor), step
    assert cli.trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0)
    with pytest.raises(
        ValueError, match=r"lr_decay_steps must be \[start, end\] with 0 <= start < end, got \[3, 3\]"
    ):
        EncoderPretraining(lr_decay_steps=(3, 3))  # refused before any model is loaded
