"""Per-group learning rates of a tuning run: ``embedding_lr`` (v*) and ``unet_lr`` (every UNet weight).

The rest of the trainable parameters (cores, factors) train at the optimizer's rate; a rate left unset leaves its
parameters there too, so a run without either option builds the optimizer it always did.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import train
from lightning_modules.tuning_rates import rate_groups
from tests.cli_runs import tune_args


def _params(n: int) -> list[nn.Parameter]:
    return [nn.Parameter(torch.zeros(1)) for _ in range(n)]


def test_no_rate_set_keeps_the_parameter_list():
    a, b, c = _params(3)
    assert rate_groups([a, b, c], [([a], None), ([b], None)]) == [a, b, c]


def test_each_rate_is_its_own_group_and_the_rest_keep_the_optimizers_rate():
    a, b, c, d = _params(4)
    groups = rate_groups([a, b, c, d], [([b], 0.05), ([c, d], 3e-4)])
    assert [(g["params"], g.get("lr")) for g in groups] == [([a], None), ([b], 0.05), ([c, d], 3e-4)]


def test_a_frozen_member_and_an_empty_rest_make_no_group():
    a, b, frozen = _params(3)
    groups = rate_groups([a, b], [([a, b], 0.05), ([frozen], 3e-4)])
    assert [(g["params"], g["lr"]) for g in groups] == [([a, b], 0.05)]


def test_a_parameter_with_two_rates_is_refused():
    (a,) = _params(1)
    with pytest.raises(ValueError, match="two learning rates"):
        rate_groups([a], [([a], 0.05), ([a], 3e-4)])


def test_embedding_lr_and_unet_lr_reach_the_optimizer(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt):
    model = {"embedding_lr": 0.05, "unet_lr": 3e-4, "tune": ["embedding", "cores", "unet"]}
    cli = train.main(
        tune_args(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=1, model=model), run=False
    )
    module = cli.model
    optimizer = module.configure_optimizers()
    groups = [({id(p) for p in g["params"]}, g["lr"]) for g in optimizer.param_groups]
    unet = {id(p) for p in module.backbone.unet.parameters()}
    assert groups == [({id(module.cores)}, 1e-3), ({id(module.v_star)}, 0.05), (unet, 3e-4)]


def test_without_the_options_the_optimizer_has_one_group(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt):
    cli = train.main(tune_args(tmp_path, tiny_sd_dir, index_dir, pretrain_ckpt, steps=1), run=False)
    (group,) = cli.model.configure_optimizers().param_groups
    assert {id(p) for p in group["params"]} == {id(cli.model.v_star), id(cli.model.cores)}
    assert group["lr"] == 1e-3
