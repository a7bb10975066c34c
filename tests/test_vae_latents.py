"""``vae_latents``: the diffusion targets are the VAE posterior's mean (the default) or, as diffusers' training
scripts do, one draw from the posterior made on the step's own generator. A multi-concept run's draws equal the
single runs' (tests/test_batched.py)."""

from __future__ import annotations

import pytest
import torch

import lightning_modules.base as base
import train
from tests.cli_runs import fit, tune_args


def test_a_posterior_draw_is_the_mean_plus_the_std_times_the_generators_noise(backbone):
    pixels = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = backbone.vae.encode(pixels).latent_dist
        scale = backbone.vae.config.scaling_factor
        mean = backbone.encode_images(pixels)
        first = backbone.encode_images(pixels, generator=torch.Generator().manual_seed(1))
        again = backbone.encode_images(pixels, generator=torch.Generator().manual_seed(1))
        other = backbone.encode_images(pixels, generator=torch.Generator().manual_seed(2))
    assert torch.equal(mean, dist.mean * scale)
    assert torch.equal(first, again) and not torch.equal(first, other)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(first, (dist.mean + dist.std * eps) * scale)
    z = (first - mean) / (dist.std * scale)  # standard normal if the draw is the posterior's
    assert abs(float(z.mean())) < 0.1 and 0.9 < float(z.std()) < 1.1


def _record_targets(monkeypatch, module) -> list[torch.Tensor]:
    seen = []
    real = module.add_noise

    def recording(scheduler, latents, generator=None, timesteps=None):
        seen.append(latents.detach().clone())
        return real(scheduler, latents, generator=generator, timesteps=timesteps)

    monkeypatch.setattr(module, "add_noise", recording)
    return seen


def test_tuning_on_posterior_draws_targets_a_new_draw_each_step(
    tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path, monkeypatch
):
    seen = _record_targets(monkeypatch, base)
    runs = {}
    for mode in ("mean", "sample"):
        start = len(seen)
        args = tune_args(
            tmp_path / mode, tiny_sd_dir, index_dir, pretrain_ckpt, steps=2, model={"vae_latents": mode}
        )
        cli = fit(args)
        assert cli.model.vae_latents == mode
        runs[mode] = seen[start:]
    mean, sample = runs["mean"], runs["sample"]
    assert len(mean) == len(sample) == 2  # one target batch per step; both runs see the same augmented images
    draws = [drawn - centre for drawn, centre in zip(sample, mean)]
    for d in draws:
        assert (
            d.abs().max() > 0 and d.abs().max() < 1.0
        )  # around the posterior's mean: a draw, not other noise
    assert not torch.equal(draws[0], draws[1])  # a new posterior draw every step


def test_an_unknown_vae_latents_value_is_refused_before_any_work(
    tiny_sd_dir, index_dir, pretrain_ckpt, tmp_path, capsys
):
    args = tune_args(
        tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=1, model={"vae_latents": "median"}
    )
    with pytest.raises(SystemExit) as exit_info:
        train.main(args, run=False)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "vae_latents" in err and "median" in err, err
    assert not (tmp_path / "concepts").exists()
