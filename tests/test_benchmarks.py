"""Every benchmark runs end to end on the tiny backbone (1-2 steps) and writes its JSON, so none can rot unseen.

These are smoke tests, never timings: they check that each harness runs through the public API and that its
results file holds the numbers its tables are made of.
"""

from __future__ import annotations

import json

import pytest

from benchmarks import bench_batched, bench_token_index, bench_tuning, real_shape, sdxl_shape, step_probes


@pytest.mark.slow  # four fresh Python processes (one timing worker, one memory worker per method)
def test_bench_tuning_runs_and_writes_json(tmp_path):
    out = tmp_path / "tuning.json"
    bench_tuning.main(
        ["--configs", "tiny", "--repeats", "1", "--step-budget-s", "0", "--memory-steps", "1", "--date-steps", "1",
         "--lora-steps", "2", "--concept-repeats", "1", "--date-budget-s", "0", "--lora-budget-s", "0",
         "--out", str(out)]
    )  # fmt: skip
    res = json.loads(out.read_text())["configs"]["tiny"]
    methods = res["timing"]["methods"]
    assert set(methods) == {"date", "lora", "ti"}
    assert all(m["step_s"]["n"] == 1 and m["parity_gap"] < 1e-5 for m in methods.values())
    assert (
        res["timing"]["date_concept"]["steps"] == 1 and res["timing"]["lora_concept"]["measured_steps"] == 2
    )
    assert set(res["memory"]) == {"date", "lora", "ti"}


def test_bench_batched_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "batched.json"
    bench_batched.main(
        [
            "--configs",
            "tiny",
            "--ks",
            "1",
            "2",
            "--steps",
            "1",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
        ]
    )
    res = json.loads(out.read_text())["configs"]["tiny"]
    assert set(res["ks"]) == {"1", "2"}
    for k, r in res["ks"].items():
        assert len(r["batched_s"]) == len(r["sequential_s"]) == 1
        assert r["batched_concepts_per_hour"] == 3600 * int(k) / r["batched_s"][0]
    assert json.loads(out.read_text())["configs"]["tiny"]["tune"] == ["embedding", "cores"]
    assert "| 2 |" in capsys.readouterr().out


@pytest.mark.slow  # the whole real-shape benchmark end to end (four phases), about 12 s
def test_real_shape_runs_and_writes_json(tmp_path, tiny_sd_dir):
    out = tmp_path / "real_shape.json"
    real_shape.main(
        ["--backbone", str(tiny_sd_dir), "--backbone-config", "configs/backbone/tiny.yaml", "--warmup", "1",
         "--steps", "1", "--rounds", "1", "--precision", "32-true", "--batched", "2", "--out", str(out)]
    )  # fmt: skip
    res = json.loads(out.read_text())
    assert set(res["phases"]) == {"pretrain", "date", "lora", "date_batched"}
    batched = res["phases"]["date_batched"]
    assert batched["k"] == 2 and batched["batch"] == 8 and len(batched["steps_s"]) == 1
    assert res["per_concept_s"]["date_batched"] == pytest.approx(
        (batched["fit_start_to_first_step_s"] + 12 * batched["step_s"]) / 2
    )
    assert (
        res["rounds_detail"][0]["date"]["warmup_s"] and len(res["rounds_detail"][0]["date"]["steps_s"]) == 1
    )
    ranges = res["profile"]["ranges_s"]
    assert all(ranges[k] > 0 for k in step_probes.RANGES), ranges
    assert ranges["attention_forward"] < ranges["unet_forward"] < res["profile"]["step_s"]


def test_bench_token_index_runs_and_writes_json(tmp_path):
    out = tmp_path / "index.json"
    bench_token_index.main(
        ["--vocab", "300", "--dim", "16", "--queries", "4", "--ks", "1", "--repeats", "1", "--out", str(out)]
    )
    res = json.loads(out.read_text())
    assert res["recall"]["faiss exact (FlatIP) k=1"] == 1.0 and len(res["build_s"]) == 3


def test_sdxl_shape_sizes_write_json(tmp_path):
    out = tmp_path / "sdxl.json"
    sdxl_shape.main(["--sizes-only", "--out", str(out)])
    assert json.loads(out.read_text())["sizes"]["unet_params"] == 2_567_463_684


def test_bench_batched_sizes_the_images_for_the_backbone(tmp_path):
    """small25m's image encoder reads 64 px while the tuning YAML it shares with tiny says 32: the harness must
    size the data from the backbone it built (this config died with a clip_size error before)."""
    out = tmp_path / "batched_small25m.json"
    bench_batched.main(
        ["--configs", "small25m", "--ks", "1", "--steps", "1", "--repeats", "1", "--warmup", "0", "--out", str(out)]
    )  # fmt: skip
    res = json.loads(out.read_text())["configs"]["small25m"]
    assert len(res["ks"]["1"]["batched_s"]) == 1 and res["ks"]["1"]["batched_s"][0] > 0
