"""The training loop's own defects on a GPU-shaped run: noise under gradient accumulation, NaN on one rank,
host-device reads per step, sampling after the optimizer step (tiny backbone, CPU)."""

from __future__ import annotations

import torch

import lightning_modules.base as base
from tests.cli_runs import fit, pretrain_args


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
