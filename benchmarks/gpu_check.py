"""The prepared GPU check (``scripts/gpu_check.sh``): every GPU path once, with timings, on random weights.

Usage::

    scripts/gpu_check.sh                                   # SD-1.5 shapes on the GPU, about 4-6 min expected
    scripts/gpu_check.sh --shape tiny --device cpu --pretrain-steps 2 --tune-steps 2 --concepts 2 --batch-k 2
    python -m benchmarks.gpu_check --help

No downloads: the weights are random, in the shapes of ``configs/backbone/<shape>.yaml`` (``sd15_shape`` or
``tiny``), built by ``models.tiny`` into ``--cache`` once. The recipes are the committed GPU presets
(``configs/pretrain/sd15.yaml``, ``configs/tune/sd15.yaml``, ``configs/trainer/ddp.yaml``); only the weights,
sizes, step counts and output folders are overridden. Checks, one line each on stdout:

1. ``weights``: build or reuse the random backbone.
2. ``pretrain``: ``train.py fit`` on the pretraining preset, ``--pretrain-steps`` steps, bf16-mixed, bf16 frozen
   backbone; per-step times and peak memory; writes the encoder checkpoint the next checks use.
3. ``tune``: ``train.py fit`` on the DATE tuning preset (``--tune-steps`` steps, 12 by default), exporting the
   concept and its diffusers pair.
4. ``per_concept``: the evaluation's tuner (``evaluation.tuning.ConceptTuner``: one module, resident on the
   device) on ``--concepts`` concepts after one warm-up concept: wall seconds per concept and concepts per hour.
5. ``batched``: the same module tuning ``--batch-k`` concepts in one run (UNet gradient checkpointing on):
   concepts per hour.
6. ``sample``: dual-path sampling of a tuned concept (``--sample-steps`` DDIM steps, guidance 3).
7. ``export``: the diffusers pair reloaded into a plain ``StableDiffusionPipeline`` (``load_lora_weights`` +
   ``load_textual_inversion``) and sampled.
8. ``ddp``: ``train.py fit`` with ``configs/trainer/ddp.yaml`` on ``--ddp-devices`` processes (default: every GPU;
   on CPU, 2 gloo processes), in a subprocess (Lightning relaunches the command per rank).

The JSON (``--out``) holds each check's status, seconds, step times, peak memory (CUDA: max allocated; CPU: peak
resident set of this process) and the derived seconds per concept and concepts per hour, with the targets.
Exit status 0 when every check passed, 1 otherwise (later checks still run when they do not depend on a failed one).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import machine_notes
from benchmarks.gpu_check_measure import Checks
from benchmarks.gpu_check_measure import StepTimer as StepTimer  # re-exported: its old class path still works
from benchmarks.gpu_check_runs import SHAPES, TARGETS, GpuCheck


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="sd15", help="backbone shape (random weights)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--work", default="outputs/gpu_check", help="folder of the runs' outputs")
    p.add_argument("--cache", default=".cache/gpu_check", help="folder of the built random weights (reused)")
    p.add_argument("--out", default=None, help="JSON results (default: <work>/gpu_check.json)")
    p.add_argument("--pretrain-steps", type=int, default=20)
    p.add_argument(
        "--pretrain-batch", type=int, default=8, help="images per pretraining step (the preset's 8)"
    )
    p.add_argument("--tune-steps", type=int, default=12, help="DATE tuning steps per concept")
    p.add_argument("--concepts", type=int, default=3, help="timed concepts of the per-concept check")
    p.add_argument("--batch-k", type=int, default=16, help="concepts tuned together in the batched check")
    p.add_argument("--batched-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--ddp-devices", type=int, default=0, help="0: every GPU (CPU: 2 gloo processes)")
    p.add_argument("--ddp-timeout", type=int, default=300, help="seconds before the DDP run is called hung")
    p.add_argument("--verbose", action="store_true", help="the libraries' own notices and bars too")
    p.add_argument(
        "--num-workers", type=int, default=None, help="data loader workers (default: the presets')"
    )
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(
            f"--device {args.device}: no CUDA device here (use --device cpu --shape tiny for the smoke test)"
        )
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        from models.quiet import quiet_libraries

        quiet_libraries()
    start = time.perf_counter()
    state = GpuCheck(args)
    checks = Checks(state.device)
    if state.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    checks.run("weights", state.build_weights)
    checks.run("pretrain", state.pretrain, needs=("weights",))
    checks.run("tune", state.tune, needs=("pretrain",))
    checks.run("per_concept", state.per_concept, needs=("pretrain",))
    checks.run("batched", state.batched, needs=("per_concept",))
    checks.run("sample", state.sample, needs=("per_concept",))
    checks.run("export", state.export, needs=("tune",))
    checks.run("ddp", state.ddp, needs=("weights",))
    total = time.perf_counter() - start
    r = checks.results
    summary = {
        "seconds_per_concept": r["per_concept"].get("seconds_per_concept"),
        "concepts_per_hour_sequential": r["per_concept"].get("concepts_per_hour"),
        "concepts_per_hour_batched": r["batched"].get("concepts_per_hour"),
        "pretrain_step_s_median": r["pretrain"].get("step_s_median"),
        "tune_step_s_median": r["tune"].get("step_s_median"),
        "peak_gib": {name: c.get("peak_gib") for name, c in r.items()},
    }
    out = Path(args.out) if args.out else state.work / "gpu_check.json"
    payload = {"args": vars(args), "machine": machine_notes(state.device), "total_s": total,
               "targets": TARGETS, "summary": summary, "checks": r}  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str))
    ok = all(c.get("ok") for c in r.values())
    print(
        f"gpu_check: {'all checks passed' if ok else 'FAILED'} in {total:.0f} s; results in {out}", flush=True
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
