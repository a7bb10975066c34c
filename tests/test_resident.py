"""The evaluation's tuner keeps one module on its device across fits: no reload, no move back to the host.

Lightning's ``Strategy.teardown`` calls ``lightning_module.cpu()`` after every ``fit``; on a GPU that is a
full-backbone copy per concept inside ``tune_seconds``. On this CPU-only machine a move to the CPU is free, so the
tests watch the call itself (and that the parameters keep their storage), and check that the plain strategy does
make the call, so the test would see a regression.
"""

from __future__ import annotations

import pytest
import torch
from lightning import Trainer

import lightning_modules.base as base
from datamodules import ConceptDataModule
from evaluation.concepts.base import load_concepts
from evaluation.concepts.synthetic import SyntheticConcepts
from evaluation.config import MethodSpec
from evaluation.recipe import resolve_recipe
from evaluation.tuning import ConceptTuner
from lightning_modules.resident import ResidentStrategy


@pytest.fixture
def tuner(tiny_sd_dir, tmp_path, monkeypatch):
    loads = []
    real = base.load_backbone
    monkeypatch.setattr(base, "load_backbone", lambda *a, **k: loads.append(a) or real(*a, **k))
    overrides = {
        "model.init_args.pretrained_model_name_or_path": str(tiny_sd_dir),
        "model.init_args.image_encoder_name_or_path": str(tiny_sd_dir),
        "model.init_args.token_index_cache": None,
        "data.init_args.batch_size": 1,
    }
    spec = MethodSpec(name="ti", overlay="configs/tune/methods/textual_inversion.yaml")
    recipe = resolve_recipe("configs/tune/tiny.yaml", spec, overrides, str(tmp_path / "export"))
    tuner = ConceptTuner(recipe)
    tuner.loads = loads
    return tuner


def _watch_moves(module) -> list[str]:
    """Records every ``.cpu()`` call on the module or its backbone (what Lightning's teardown calls)."""
    calls: list[str] = []
    for name, target in (("module", module), ("backbone", module.backbone)):
        real = target.cpu
        object.__setattr__(target, "cpu", lambda real=real, name=name: calls.append(name) or real())
    return calls


def test_second_fit_neither_reloads_nor_moves_the_backbone(tuner, tmp_path):
    first, second = load_concepts(SyntheticConcepts(synthetic_ids=[60, 61], prompts=["a <s*>"]), "<s*>")
    module = tuner.module
    assert module.device == tuner.device
    storage = {n: p.data_ptr() for n, p in module.backbone.named_parameters()}
    moves = _watch_moves(module)
    tuner.tune(first, [1], tmp_path / "a")
    tuner.tune(second, [1], tmp_path / "b")
    assert moves == []  # Lightning's teardown would call module.cpu() after each fit
    assert len(tuner.loads) == 1 and tuner.module is module
    assert {n: p.data_ptr() for n, p in module.backbone.named_parameters()} == storage
    assert module.device == tuner.device
    assert isinstance(module.trainer.strategy, ResidentStrategy)
    assert module.trainer.strategy.optimizers == []  # released, not copied to the host


def test_plain_lightning_teardown_moves_the_module(tuner):
    """What the resident strategy avoids: the default strategy calls ``.cpu()`` at the end of ``fit``."""
    module = tuner.module
    moves = _watch_moves(module)
    concept = load_concepts(SyntheticConcepts(synthetic_ids=[60], prompts=["a <s*>"]), "<s*>")[0]
    data = ConceptDataModule(
        **tuner.recipe.data_kwargs, **concept.data_args, steps=1, placeholder=tuner.recipe.placeholder
    )
    module.reset_concept(concept.name)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False)
    trainer.fit(module, datamodule=data)
    assert moves == ["module"]


def test_resident_strategy_keeps_its_device_index(monkeypatch):
    assert ResidentStrategy("cuda:1").root_device == torch.device("cuda:1")
    assert ResidentStrategy().root_device == torch.device("cpu")
    # "cuda" alone gets the current device's index: Lightning's torch.cuda.set_device(root_device) needs one.
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert ResidentStrategy("cuda").root_device == torch.device("cuda:3")


def test_batched_benchmark_keeps_its_module_on_the_device():
    from benchmarks import bench_batched

    trainer = bench_batched._trainer(bench_batched.parse_args(["--device", "cpu"]))
    assert isinstance(trainer.strategy, ResidentStrategy)
