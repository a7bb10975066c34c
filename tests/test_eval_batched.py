"""The evaluation's tuning stage with ``concepts_per_batch`` (K): K concepts of a batchable method per run.

Tolerance of "K = 3 equals K = 1": every artefact tensor (v* and the LoRA factors made from the cores) of each
concept's snapshot matches its one-concept run to ``atol 1e-5`` (v* entries are about 0.1, the cores' factors
below 1), as in ``tests/test_batched.py``: the arithmetic is the same per concept (its own noise, loss mean,
pull and AdamW state rows), only the float32 rounding of a 3-concept batch may differ from a 1-concept one.
Measured on the toy world in float32 on one CPU thread: the artefacts are bit-identical (max difference 0.0 after
12 steps); 1e-5 leaves room for other reduction orders (more threads, a GPU).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import evaluate
from evaluation.concepts.base import load_concepts
from evaluation.config import MethodSpec
from evaluation.recipe import resolve_recipe
from evaluation.tuning import ARTIFACTS_DIR, ConceptTuner, snapshot_path
from models.artifact import ConceptArtifact
from toyworld.named.concepts import ToyWorldConcepts

REPO = Path(__file__).resolve().parents[1]
TUNE = str(REPO / "configs" / "tune" / "toyworld.yaml")
QUICK = str(REPO / "configs" / "evaluate" / "toyworld_quick.yaml")
NAMES = ["red_plain_heart", "purple_checkered_moon", "red_striped_star"]
STEPS = [0, 3]
ATOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval_batched")
    overrides = {
        "model.init_args.torch_dtype": "float32",
        "model.init_args.token_index_cache": str(root / "index"),
        # v* and the cores (METHOD.md's set); with the LoRA factors too: test_date_tuning_the_factors_batches_too
        "model.init_args.tune": ["embedding", "cores"],
    }

    def recipe(name: str, overlay: str | None = None, out: str = "k3", **more):
        spec = MethodSpec(name=name, overlay=overlay)
        return resolve_recipe(TUNE, spec, {**overrides, **more}, str(root / out / ARTIFACTS_DIR / name))

    spec = ToyWorldConcepts(concepts_dir=str(REPO / "assets/toyworld/concepts"), names=NAMES, num_prompts=1)
    return root, recipe, load_concepts(spec, "<s*>")


def _tensors(art: ConceptArtifact) -> dict[str, torch.Tensor]:
    out = {"v_star": art.v_star}
    for name, (down, up) in art.lora.items():
        out[f"{name}.down"], out[f"{name}.up"] = down, up
    return out


def _check_k3_equals_k1(
    setup, name: str, overlay: str | None = None, atol: float = ATOL, **more
) -> dict[str, dict]:
    """Tunes the concepts one per run and 3 in one run; every K = 3 snapshot equals its K = 1 one."""
    root, recipe, concepts = setup
    alone = ConceptTuner(recipe(name, overlay, out="k1", **more))
    single = {c.name: alone.tune(c, STEPS, root / "k1" / name / c.name) for c in concepts}
    batched = ConceptTuner(recipe(name, overlay, **more), concepts_per_batch=3)
    assert batched.per_batch == 3
    got = batched.snapshots(concepts, lambda c: set(STEPS), root / "k3", STEPS)
    assert batched.tuned == 3 and batched.seconds > 0
    assert set(got) == set(STEPS)
    for c in concepts:
        for k in STEPS:
            path = snapshot_path(root / "k3" / ARTIFACTS_DIR / name / c.name, k)
            art = ConceptArtifact.load(path)  # the paths K = 1 writes, one folder per concept
            ref = single[c.name][k]
            assert art.steps == ref.steps == k
            assert art.extra["class_noun"] == ref.extra["class_noun"]
            assert float(art.extra["tune_seconds"]) > 0
            a, b = _tensors(art), _tensors(ref)
            assert a.keys() == b.keys()
            for key in a:
                torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=f"{c.name} {k} {key}")
    v = [single[n][3].v_star for n in NAMES]
    assert not torch.allclose(v[0], v[1], atol=1e-3)  # the concepts differ: no slot mix-up goes unseen
    return single


def test_k3_equals_k1_per_concept_same_paths(setup):
    root = setup[0]
    _check_k3_equals_k1(setup, "date")
    # The group's final artefacts are written as a single run writes them (export_dir/<concept>.safetensors).
    assert all((root / "k3" / ARTIFACTS_DIR / "date" / f"{n}.safetensors").is_file() for n in NAMES)


def test_date_tuning_the_factors_batches_too(setup):
    """The named world's default (configs/tune/toyworld.yaml tunes the LoRA factors): each concept its own copy.
    Not bit for bit here: tuned factors take tests/test_batched.py's 1e-4 (Adam moves an entry whose gradient is
    near zero by a step-sized amount either way)."""
    _check_k3_equals_k1(
        setup, "date_factors", atol=1e-4, **{"model.init_args.tune": ["embedding", "cores", "factors"]}
    )


def test_textual_inversion_batches_too(setup):
    """v* alone, started from the class noun, weight decay on: per concept as well."""
    _check_k3_equals_k1(setup, "textual_inversion", str(REPO / "configs/tune/methods/textual_inversion.yaml"))


def _fake_tuning(root: Path, groups: list[list[str]]):
    """Records each group and writes the K = 3 run's snapshots where tuning would write them."""

    def tune_group(group, steps, save_dirs):
        groups.append([c.name for c in group])
        for c, folder in zip(group, save_dirs):
            shutil.copytree(root / "k3" / ARTIFACTS_DIR / "date" / c.name, folder)

    return tune_group


def test_groups_hold_only_concepts_still_to_tune(setup, monkeypatch):
    """Resume: concepts whose needed snapshots exist are loaded, not tuned again, and do not join a group."""
    root, recipe, concepts = setup
    out = root / "resume"
    shutil.copytree(root / "k3" / ARTIFACTS_DIR / "date" / NAMES[1], out / ARTIFACTS_DIR / "date" / NAMES[1])
    tuner, groups = ConceptTuner(recipe("date"), concepts_per_batch=3), []
    monkeypatch.setattr(tuner, "tune_group", _fake_tuning(root, groups))
    monkeypatch.setattr(ConceptTuner, "per_batch", 3)  # no backbone needed to group
    for i in range(3):  # as the harness asks, concept by concept
        assert set(tuner.snapshots(concepts[i:], lambda c: set(STEPS), out, STEPS)) == set(STEPS)
    assert groups == [[NAMES[0], NAMES[2]]] and tuner.tuned == 2


def test_shared_weights_method_stays_sequential(setup, monkeypatch):
    """One-shot LoRA tunes a UNet LoRA every concept would share: one concept per run whatever K is."""
    root, recipe, concepts = setup
    lora = recipe("date", str(REPO / "configs/tune/methods/lora.yaml"))  # named date: the fake's folders
    tuner, groups = ConceptTuner(lora, concepts_per_batch=3), []
    assert tuner.per_batch == 1
    monkeypatch.setattr(tuner, "tune_group", _fake_tuning(root, groups))
    for i in range(3):
        tuner.snapshots(concepts[i:], lambda c: set(STEPS), root / "lora", STEPS)
    assert groups == [[n] for n in NAMES]


@pytest.mark.parametrize("value", ["0", "-2"])
def test_bad_concepts_per_batch_is_one_line_error(tmp_path, capsys, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["run", "--config", QUICK, "--out_dir", str(out), "--concepts_per_batch", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == f"evaluate.py: error: concepts_per_batch must be an integer >= 1, got {value}"
    assert not out.exists()  # refused before any work
