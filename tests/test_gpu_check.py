"""``scripts/gpu_check.sh`` end to end on the CPU, in tiny shapes and a few steps: every check passes and the JSON
holds the numbers benchmarks/README.md reports (the GPU run is the same script with its default arguments)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHECKS = ("weights", "pretrain", "tune", "per_concept", "batched", "sample", "export", "ddp")


@pytest.mark.slow
def test_gpu_check_script_passes_on_cpu_in_tiny_shapes(tiny_sd_dir, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "tiny_shape").symlink_to(tiny_sd_dir)  # the same configs/backbone/tiny.yaml build, made once
    out = tmp_path / "result.json"
    cmd = ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--shape", "tiny", "--device", "cpu",
           "--work", str(tmp_path / "work"), "--cache", str(cache), "--out", str(out),
           "--pretrain-steps", "2", "--pretrain-batch", "2", "--tune-steps", "2", "--concepts", "1",
           "--batch-k", "2", "--sample-steps", "2", "--num-workers", "0", "--ddp-devices", "1"]  # fmt: skip
    env = dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("gpu_check: ")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in CHECKS:
        assert sum(line.startswith(f"gpu_check: {name}: ok ") for line in lines) == 1, (name, lines)
    assert lines[-1].startswith("gpu_check: all checks passed")

    result = json.loads(out.read_text())
    checks, summary = result["checks"], result["summary"]
    assert all(checks[name]["ok"] for name in CHECKS)
    assert len(checks["pretrain"]["step_s"]) == 2 and len(checks["tune"]["step_s"]) == 2
    assert checks["pretrain"]["backbone_dtypes"] == ["torch.bfloat16"]  # the preset's bf16 frozen backbone
    assert summary["seconds_per_concept"] > 0 and summary["concepts_per_hour_batched"] > 0
    assert all(v > 0 for v in summary["peak_gib"].values())
    assert result["targets"] == {"per_concept_seconds_max": 2.0, "batched_concepts_per_hour_min": 2000.0}
    assert (tmp_path / "work" / "concepts" / "gpu_check_diffusers" / "learned_embeds.safetensors").is_file()


def test_gpu_check_refuses_cuda_without_a_gpu(tmp_path):
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--work", str(tmp_path)],
        env=dict(os.environ, PYTHON=sys.executable),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and "no CUDA device here" in proc.stderr
