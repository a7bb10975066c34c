"""What an evaluation folder was made with: a rerun resumes only a folder of the same configuration, and
``--overwrite`` leaves nothing of an earlier run behind."""

from __future__ import annotations

import json

import pytest

from evaluation.concepts.synthetic import SyntheticConcepts
from evaluation.config import EvaluationConfigError, MethodSpec, SamplingSpec
from evaluation.metrics.suite import MetricSpec
from evaluation.store.run_state import OUTPUTS, RECORD_FILE, check_run_record, run_record, write_json
from toyworld.named.concepts import ToyWorldConcepts


def _record(concepts, concepts_per_batch: int = 1) -> dict:
    methods = [MethodSpec(name="date")]
    return run_record(
        "configs/tune/toyworld.yaml",
        {},
        {},
        methods,
        concepts,
        SamplingSpec(),
        MetricSpec(),
        {},
        concepts_per_batch,
    )


def _folder_made_with(tmp_path, concepts):
    out = tmp_path / "out"
    out.mkdir()
    write_json(out / RECORD_FILE, _record(concepts))
    (out / "results.csv").write_text("rows of the first run\n")
    return out


def test_a_concept_sets_own_settings_are_part_of_the_resume_key(tmp_path):
    """The toy-world concepts' seed draws every prompt: a rerun with another seed would mix rows of two prompt
    sets under the same keys, so it must refuse (on main 99742e1 it resumed)."""
    out = _folder_made_with(tmp_path, ToyWorldConcepts(seed=0, num_prompts=3))
    with pytest.raises(EvaluationConfigError, match="concepts.seed"):
        check_run_record(out, _record(ToyWorldConcepts(seed=1, num_prompts=3)), overwrite=False)
    with pytest.raises(EvaluationConfigError, match="concepts.concepts_dir"):
        check_run_record(out, _record(ToyWorldConcepts("elsewhere", num_prompts=3)), overwrite=False)
    with pytest.raises(EvaluationConfigError, match="concepts.class_path"):
        check_run_record(out, _record(SyntheticConcepts(prompts=["a <s*>"])), overwrite=False)
    # More concepts or prompts only add rows: the folder resumes.
    more = ToyWorldConcepts(seed=0, num_prompts=6, names=["red_striped_star"])
    check_run_record(out, _record(more), overwrite=False)


def test_concepts_per_batch_is_recorded_but_a_folder_resumes_with_another_k(tmp_path):
    """run.json says how many concepts one tuning run held; a rerun with another K resumes, since batched rows
    equal the sequential ones within tolerance."""
    out = _folder_made_with(tmp_path, ToyWorldConcepts(seed=0, num_prompts=3))
    assert json.loads((out / RECORD_FILE).read_text())["tuning"] == {"concepts_per_batch": 1}
    batched = _record(ToyWorldConcepts(seed=0, num_prompts=3), concepts_per_batch=4)
    assert batched["tuning"] == {"concepts_per_batch": 4}
    check_run_record(out, batched, overwrite=False)


def test_synthetic_concepts_resume_with_more_ids_but_not_another_seed(tmp_path):
    out = _folder_made_with(tmp_path, SyntheticConcepts([60], prompts=["a <s*>"]))
    check_run_record(out, _record(SyntheticConcepts([60, 61], prompts=["a <s*>"])), overwrite=False)
    with pytest.raises(EvaluationConfigError, match="concepts.synthetic_seed"):
        check_run_record(out, _record(SyntheticConcepts([60], 1, prompts=["a <s*>"])), overwrite=False)


def test_overwrite_removes_every_output_and_nothing_else(tmp_path):
    """Every file and folder a run writes goes, the second trade-off plot, the word table and the exports
    included (on main 99742e1 those three stayed behind); a file of the user's stays."""
    out = _folder_made_with(tmp_path, SyntheticConcepts(prompts=["a <s*>"]))
    written = ["tradeoff_clip.png", "nearest_words.md", "exports/date_export/c/s12/x.safetensors"]
    written += ["summary.json", "metrics.json", "tradeoff.png", "images/date/s0/c/00_00.png"]
    written += ["grids/date/s0.png", "artifacts/date/c/step_0000.safetensors", "tb/events.out"]
    for name in written:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text("x")
    (out / "notes.txt").write_text("mine")
    assert {p.split("/")[0] for p in written} | {"results.csv", RECORD_FILE} == set(OUTPUTS)
    check_run_record(out, _record(SyntheticConcepts(prompts=["a <s*>"])), overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
