"""The training loop's own defects on a GPU-shaped run: noise under gradient accumulation, NaN on one rank,
host-device reads per step, sampling after the optimizer step (tiny backbone, CPU)."""

from __future__ import annotations

import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import lightning_modules.base as base
import lightning_modules.samples as samples
import train
from tests.cli_runs import fit, pretrain_args, tune_args


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

    def log_samples(prompts, v_star, cores, tag, step=None):
        assert torch.equal(v_star, used[step]) and not torch.equal(v_star, module.v_star)  # before the update
        return real_log(prompts, v_star, cores, tag, step)

    monkeypatch.setattr(module, "training_step", training_step)
    monkeypatch.setattr(module, "log_samples", log_samples)
    cli.trainer.fit(module, datamodule=cli.datamodule)
    assert calls == [False, False]  # one sample per step, none while a training step's graph is alive
    events = EventAccumulator(str(next(tmp_path.rglob("events.out.tfevents.*"))), {"images": 0}).Reload()
    assert [s.step for s in events.Images("concept/samples")] == [0, 1]
