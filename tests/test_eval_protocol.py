"""Evaluation honesty: identity with and without the input image, no duplicated sweep points, extra grids,
labelled reference points and the inference autocast rule."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from evaluation.concepts.base import load_concepts
from evaluation.concepts.synthetic import SyntheticConcepts
from evaluation.config import MethodSpec, SweepGrid, SweepSpec
from evaluation.generate.modes import autocast_dtype, sampling_prompt
from evaluation.metrics.features import ClipFeatures
from evaluation.metrics.similarity import identity_scores
from evaluation.metrics.tiny_models import write_tiny_eval_models
from evaluation.plan import Setting, make_plans
from evaluation.report.plot import REFERENCE_POINTS, REFERENCE_PROTOCOLS
from models.artifact import ConceptArtifact


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ClipFeatures(write_tiny_eval_models(tmp_path_factory.mktemp("tiny_eval"))["clip"])


def test_identity_without_the_input_image_leaves_it_out(clip):
    g = torch.Generator().manual_seed(0)
    generated, refs = torch.rand(2, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    refs[0] = generated[0]  # a generation that copies the input image
    full = identity_scores(clip, generated, refs)
    without = identity_scores(clip, generated, refs, exclude=0)
    torch.testing.assert_close(without, identity_scores(clip, generated, refs[1:]))
    assert full[0] > without[0]  # the copy is rewarded only when the input is among the references
    with pytest.raises(ValueError, match="no reference"):
        identity_scores(clip, generated, refs[:1], exclude=0)


def test_concepts_name_their_input_reference():
    (concept,) = load_concepts(SyntheticConcepts(synthetic_ids=[60], prompts=["a <s*>"]), "<s*>")
    assert concept.input_reference_index == 0  # the un-augmented render the concept is tuned from


def _plans(tmp_path: Path, methods: list[MethodSpec], sweep: SweepSpec):
    # Planning reads each encoder checkpoint (weights only) and checks its phase; it loads no model.
    ckpt, other = (
        Path("assets/toyworld/encoder/date.ckpt"),
        Path("assets/toyworld/encoder/no_regularizer.ckpt"),
    )
    for m in methods:
        if m.name == "no_regularizer":
            m.overrides = {"model.init_args.encoder_checkpoint": str(other)}
    concepts = SyntheticConcepts(synthetic_ids=[60], prompts=["a <s*>"])
    _, _, plans = make_plans(
        tmp_path,
        "configs/tune/tiny.yaml",
        methods,
        concepts,
        sweep,
        {"model.init_args.encoder_checkpoint": str(ckpt)},
    )
    return {p.spec.name: p for p in plans}


def test_methods_sharing_the_initial_prediction_do_not_repeat_step_0(tmp_path):
    methods = [
        MethodSpec(name="date"),
        MethodSpec(name="encoder_only", overlay="configs/tune/methods/encoder_only.yaml"),
        MethodSpec(name="no_regularizer", overlay="configs/experiments/no_regularizer/tune_tiny.yaml"),
        MethodSpec(
            name="textual_inversion", overlay="configs/tune/methods/textual_inversion.yaml", alphas=[1.0]
        ),
    ]
    plans = _plans(tmp_path, methods, SweepSpec(steps=[0, 4], alphas=[0.5, 1.0]))
    assert [s.steps for s in plans["date"].settings] == [0, 0, 4, 4]
    assert plans["encoder_only"].settings == []  # its only points are date's step 0
    assert plans["encoder_only"].aliases == {
        "s0_a0.5_g7.5": "date/s0_a0.5_g7.5",
        "s0_a1_g7.5": "date/s0_a1_g7.5",
    }
    # Another encoder (pretrained without the regulariser) or another init: a different step 0, kept.
    assert Setting(0, 0.5, 7.5) in plans["no_regularizer"].settings and not plans["no_regularizer"].aliases
    assert Setting(0, 1.0, 7.5) in plans["textual_inversion"].settings
    every = [(name, s) for name, p in plans.items() for s in p.settings]
    assert len(every) == len(set(every))


def test_extra_grids_add_points_once_and_method_lists_win(tmp_path):
    sweep = SweepSpec(
        steps=[0, 12],
        alphas=[0.5],
        grids=[
            SweepGrid(steps=[12], alphas=[0.3, 0.5, 1.0]),
            SweepGrid(steps=[12], guidance_scales=[3.0, 7.5]),
        ],
    )
    methods = [
        MethodSpec(name="date"),
        MethodSpec(name="ti", overlay="configs/tune/methods/textual_inversion.yaml", alphas=[1.0]),
    ]
    plans = _plans(tmp_path, methods, sweep)
    assert plans["date"].settings == sorted(
        {
            Setting(0, 0.5, 7.5),
            Setting(12, 0.5, 7.5),
            Setting(12, 0.3, 7.5),
            Setting(12, 1.0, 7.5),
            Setting(12, 0.5, 3.0),
        }
    )
    assert {s.alpha for s in plans["ti"].settings} == {1.0}
    assert Setting(12, 1.0, 3.0) in plans["ti"].settings


def test_reference_points_carry_their_protocol():
    assert set(REFERENCE_POINTS) <= set(REFERENCE_PROTOCOLS)
    for name in ("DreamBooth (SD), 3-5 images", "Textual Inversion, 3-5 images"):
        assert "3-5" in REFERENCE_PROTOCOLS[name] and "ViT-S/16" in REFERENCE_PROTOCOLS[name]
    assert all("as reported by" in REFERENCE_PROTOCOLS[n] for n in ("ELITE", "IP-Adapter (SD 1.5)"))


def test_inference_autocast_is_bf16_on_cuda_and_off_on_cpu_unless_asked():
    assert autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("auto", "cuda") is torch.bfloat16
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    assert autocast_dtype("off", "cuda") is None


def test_lora_samples_with_sks_and_the_class_noun():
    art = ConceptArtifact(
        v_star=torch.zeros(4),
        lora={},
        placeholder="<s*>",
        nearest_token="sks</w>",
        nearest_token_id=0,
        alpha=1.0,
        base_model="m",
        fingerprint="f",
        steps=0,
        extra={"instance_prompt": "a photo of {identifier} {class_noun}"},
    )
    assert sampling_prompt(art, "a <s*> on the beach", "dog") == "a <s*> dog on the beach"
    art.extra = {}
    assert sampling_prompt(art, "a <s*> on the beach", "dog") == "a <s*> on the beach"
