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
import contextlib
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from lightning import Callback

from benchmarks.common import _status_kib, machine_notes, release_free_memory, sync

ROOT = Path(__file__).resolve().parents[1]
PRETRAIN = ROOT / "configs" / "pretrain" / "sd15.yaml"
TUNE = ROOT / "configs" / "tune" / "sd15.yaml"
DDP = ROOT / "configs" / "trainer" / "ddp.yaml"
SHAPES = {"sd15": "sd15_shape.yaml", "tiny": "tiny.yaml"}
# The tiny shape gets the tiny recipe's module sizes (configs/pretrain/tiny.yaml): the SD-1.5 ones would dwarf it.
TINY_PERSONALIZER = {
    "feature_dim": 64,
    "unet_hidden_dim": 128,
    "token_hidden_dim": 128,
    "hyper_hidden_dim": 64,
}
TARGETS = {"per_concept_seconds_max": 2.0, "batched_concepts_per_hour_min": 2000.0}
GIB = 2**30
PROMPT = "a photo of <s*> on a beach"


class StepTimer(Callback):
    """Wall seconds of every training step, synchronised on the device.

    Args:
        device: ``cpu`` or ``cuda`` (``cuda:N``).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._begin)


class Peak:
    """Absolute peak memory of a stretch of code: CUDA max allocated, or this process's peak resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            release_free_memory()
            with contextlib.suppress(OSError):  # no resettable mark: the process's peak so far
                Path("/proc/self/clear_refs").write_text("5")

    def gib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return (_status_kib("VmHWM") or 0) * 1024 / GIB


class Checks:
    """Runs named checks, prints one line per check, collects the JSON."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> dict[str, Any]:
        failed = [n for n in needs if not self.results.get(n, {}).get("ok")]
        if failed:
            out = {"ok": False, "skipped": f"needs {', '.join(failed)}"}
            print(f"gpu_check: {name}: SKIPPED (needs {', '.join(failed)})", flush=True)
            self.results[name] = out
            return out
        peak = Peak(self.device)
        begin = time.perf_counter()
        try:
            out = {"ok": True, **fn()}
        except Exception as err:  # a check's failure is reported, the next checks still run
            out = {"ok": False, "error": " ".join(f"{type(err).__name__}: {err}".split())[:500]}
            out["traceback"] = traceback.format_exc()[-4000:]
        out["seconds"] = time.perf_counter() - begin
        out["peak_gib"] = peak.gib()
        self.results[name] = out
        summary = out.pop("line", "") if out["ok"] else out["error"]
        status = "ok" if out["ok"] else "FAIL"
        print(
            f"gpu_check: {name}: {status} ({out['seconds']:.1f} s, peak {out['peak_gib']:.2f} GiB) {summary}",
            flush=True,
        )
        return out


def _step_times(cli) -> list[float]:
    """The step times the CLI's :class:`StepTimer` recorded (this file may run as ``__main__``: import the class
    the CLI built)."""
    from benchmarks.gpu_check import StepTimer as Timer

    return next(c for c in cli.trainer.callbacks if isinstance(c, Timer)).seconds


def _train(args: list[str]):
    """``python train.py <args>`` in this process (the CLI reads ``sys.argv`` too: it must hold no other options)."""
    import train

    argv = sys.argv
    sys.argv = ["train.py"]
    try:
        return train.main(args)
    finally:
        sys.argv = argv


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


class GpuCheck:
    """The state the checks share: arguments, folders, the shape's sizes, the tuner."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.accelerator = "gpu" if self.device.type == "cuda" else "cpu"
        self.work = Path(args.work).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        shape = yaml.safe_load((ROOT / "configs" / "backbone" / SHAPES[args.shape]).read_text())
        self.resolution = int(shape["resolution"])
        self.clip_size = int(shape["image_encoder"]["image_size"])
        self.weights = Path(args.cache).resolve() / f"{args.shape}_shape"
        self.ckpt = self.work / "pretrain" / "ckpt" / "last.ckpt"
        self.tuner = None
        self.tuned = None

    # ----- the overrides every run shares -----
    def model_args(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pretrained_model_name_or_path": str(self.weights),
            "image_encoder_name_or_path": str(self.weights),
            "token_index_cache": str(self.work / "token_index"),
            "sample_every_n_steps": 0,
        }
        return out

    def data_args(self) -> dict[str, Any]:
        out = {"resolution": self.resolution, "clip_size": self.clip_size}
        if self.args.num_workers is not None:
            out["num_workers"] = self.args.num_workers
        return out

    def pretrain_overlay(self, steps: int, name: str, callbacks: list, devices: int) -> Path:
        model = {**self.model_args(), "probe_size": 0}
        if self.args.shape == "tiny":
            model["personalizer"] = TINY_PERSONALIZER
        trainer = {
            "accelerator": self.accelerator, "devices": devices, "max_steps": steps, "logger": False,
            "log_every_n_steps": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(self.work / name), "callbacks": callbacks,
        }  # fmt: skip
        data = {**self.data_args(), "roots": None, "batch_size": self.args.pretrain_batch}
        return _write_yaml(
            self.work / f"{name}.yaml",
            {"trainer": trainer, "model": {"init_args": model}, "data": {"init_args": data}},
        )

    # ----- the checks -----
    def build_weights(self) -> dict[str, Any]:
        from models.tiny import write_tiny_backbone

        existed = (self.weights / "model_index.json").exists()
        write_tiny_backbone(self.weights, ROOT / "configs" / "backbone" / SHAPES[self.args.shape])
        return {
            "reused": existed,
            "path": str(self.weights),
            "line": f"{self.args.shape} shape at {self.weights}",
        }

    def pretrain(self) -> dict[str, Any]:
        n = self.args.pretrain_steps
        ckpt = {
            "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
            "init_args": {"dirpath": str(self.ckpt.parent), "save_last": True, "every_n_train_steps": n,
                          "save_top_k": -1, "enable_version_counter": False},
        }  # fmt: skip
        timer = {"class_path": "benchmarks.gpu_check.StepTimer", "init_args": {"device": str(self.device)}}
        overlay = self.pretrain_overlay(n, "pretrain", [timer, ckpt], 1)
        cli = _train(["fit", "--config", str(PRETRAIN), "--config", str(overlay)])
        steps = _step_times(cli)
        dtypes = sorted({str(p.dtype) for p in cli.model.backbone.parameters()})
        if not self.ckpt.is_file():
            raise RuntimeError(f"no checkpoint at {self.ckpt}")
        del cli
        release_free_memory()
        return {
            "steps": len(steps), "step_s": steps, "step_s_median": _median(steps[1:] or steps),
            "backbone_dtypes": dtypes, "precision": "bf16-mixed",
            "line": f"{len(steps)} steps, median step {_median(steps[1:] or steps):.3f} s (first {steps[0]:.2f} s), "
            f"frozen {'/'.join(dtypes)}",
        }  # fmt: skip

    def tune(self) -> dict[str, Any]:
        n = self.args.tune_steps
        timer = {"class_path": "benchmarks.gpu_check.StepTimer", "init_args": {"device": str(self.device)}}
        trainer = {
            "accelerator": self.accelerator, "devices": 1, "max_steps": n, "logger": False,
            "enable_progress_bar": False, "default_root_dir": str(self.work / "tune"), "callbacks": [timer],
        }  # fmt: skip
        model = {**self.model_args(), "encoder_checkpoint": str(self.ckpt), "concept_name": "gpu_check",
                 "export_dir": str(self.work / "concepts"), "export_diffusers": True}  # fmt: skip
        data = {**self.data_args(), "image": None, "synthetic_concept": 60, "steps": n}
        overlay = _write_yaml(
            self.work / "tune.yaml",
            {"trainer": trainer, "model": {"init_args": model}, "data": {"init_args": data}},
        )
        begin = time.perf_counter()
        cli = _train(["fit", "--config", str(TUNE), "--config", str(overlay)])
        wall = time.perf_counter() - begin
        steps = _step_times(cli)
        exported = sorted(p.name for p in (self.work / "concepts").iterdir())
        if not (self.work / "concepts" / "gpu_check_diffusers").is_dir():
            raise RuntimeError(f"no diffusers export in {self.work / 'concepts'}: {exported}")
        del cli
        release_free_memory()
        return {
            "steps": len(steps), "step_s": steps, "step_s_median": _median(steps[1:] or steps),
            "wall_s_with_loading": wall, "exported": exported,
            "line": f"DATE-{len(steps)} via train.py in {wall:.1f} s with loading, median step "
            f"{_median(steps[1:] or steps):.3f} s; exported {', '.join(exported)}",
        }  # fmt: skip

    def _tuner(self):
        from evaluation.config import MethodSpec
        from evaluation.recipe import resolve_recipe
        from evaluation.tuning import ConceptTuner

        if self.tuner is None:
            overrides = {f"model.init_args.{k}": v for k, v in self.model_args().items()}
            overrides |= {f"data.init_args.{k}": v for k, v in self.data_args().items()}
            overrides["model.init_args.encoder_checkpoint"] = str(self.ckpt)
            overrides["trainer.max_steps"] = self.args.tune_steps
            recipe = resolve_recipe(
                str(TUNE), MethodSpec(name="date"), overrides, str(self.work / "eval_export")
            )
            self.tuner = ConceptTuner(recipe, str(self.device), "bf16-mixed", concepts_per_batch=1)
        return self.tuner

    def _concepts(self, n: int, first: int = 0):
        from evaluation.concepts.base import load_concepts
        from evaluation.concepts.synthetic import SyntheticConcepts

        # The 4 synthetic concepts held out of pretraining, reused under new names.
        ids = [60 + (first + i) % 4 for i in range(n)]
        concepts = load_concepts(SyntheticConcepts(synthetic_ids=sorted(set(ids)), prompts=[PROMPT]), "<s*>")
        by_id = {int(c.data_args["synthetic_concept"]): c for c in concepts}
        return [dataclasses.replace(by_id[i], name=f"c{first + j:03d}") for j, i in enumerate(ids)]

    def per_concept(self) -> dict[str, Any]:
        tuner = self._tuner()
        steps = [self.args.tune_steps]
        load = time.perf_counter()
        tuner.module  # noqa: B018  (builds the module and moves it to the device: not per-concept cost)
        load_s = time.perf_counter() - load
        warm, *timed = self._concepts(1 + self.args.concepts)
        self.tuned = tuner.tune(warm, steps, self.work / "per_concept" / warm.name)[steps[-1]]
        walls, tune_seconds = [], []
        for concept in timed:
            sync(self.device)
            begin = time.perf_counter()
            art = tuner.tune(concept, steps, self.work / "per_concept" / concept.name)[steps[-1]]
            sync(self.device)
            walls.append(time.perf_counter() - begin)
            tune_seconds.append(float(art.extra["tune_seconds"]))
        per = _median(walls)
        assert per is not None
        return {
            "load_s": load_s, "concepts": len(walls), "wall_s": walls, "tune_seconds": tune_seconds,
            "seconds_per_concept": per, "concepts_per_hour": 3600 / per,
            "target_seconds_per_concept": TARGETS["per_concept_seconds_max"],
            "line": f"DATE-{steps[-1]} {per:.2f} s per concept (median of {len(walls)}, tune_seconds "
            f"{_median(tune_seconds):.2f}), {3600 / per:.0f} concepts/h; target <= "
            f"{TARGETS['per_concept_seconds_max']:.0f} s on one H100 at SD-1.5 shape",
        }  # fmt: skip

    def batched(self) -> dict[str, Any]:
        tuner, k = self._tuner(), self.args.batch_k
        unet = tuner.module.backbone.unet
        if self.args.batched_checkpointing:
            unet.enable_gradient_checkpointing()
        tuner.concepts_per_batch = k
        try:
            group = self._concepts(k, first=100)
            steps = [self.args.tune_steps]
            sync(self.device)
            begin = time.perf_counter()
            tuner.tune_group(group, steps, [self.work / "batched" / c.name for c in group])
            sync(self.device)
            wall = time.perf_counter() - begin
        finally:
            tuner.concepts_per_batch = 1
            if self.args.batched_checkpointing and not tuner.module.gradient_checkpointing:
                unet.disable_gradient_checkpointing()
        rate = 3600 * k / wall
        return {
            "k": k, "wall_s": wall, "concepts_per_hour": rate,
            "gradient_checkpointing": self.args.batched_checkpointing,
            "target_concepts_per_hour": TARGETS["batched_concepts_per_hour_min"],
            "line": f"K={k} x {self.args.tune_steps} steps in {wall:.1f} s: {rate:.0f} concepts/h (one run, "
            f"first at this batch shape); target >= {TARGETS['batched_concepts_per_hour_min']:.0f}",
        }  # fmt: skip

    def sample(self) -> dict[str, Any]:
        from evaluation.generate.images import generate_images
        from evaluation.plan import Setting

        tuner, art = self._tuner(), self.tuned
        n, steps = 2, self.args.sample_steps
        setting = Setting(steps=art.steps, alpha=art.alpha, guidance=3.0)
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16)
        sync(self.device)
        begin = time.perf_counter()
        with torch.no_grad(), autocast:
            images = generate_images(tuner.module.backbone, art, [PROMPT] * n, [0, 1], setting, steps)
        sync(self.device)
        wall = time.perf_counter() - begin
        arr = np.stack([np.asarray(i, dtype=np.float32) for i in images])
        if not np.isfinite(arr).all():
            raise FloatingPointError("non-finite sampled images")
        return {
            "images": n, "inference_steps": steps, "wall_s": wall, "seconds_per_image": wall / n,
            "shape": list(arr.shape),
            "line": f"{n} images x {steps} DDIM steps (dual path, CFG) in {wall:.2f} s, {list(arr.shape[1:])}",
        }  # fmt: skip

    def export(self) -> dict[str, Any]:
        from diffusers import StableDiffusionPipeline

        folder = self.work / "concepts" / "gpu_check_diffusers"
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        pipe = StableDiffusionPipeline.from_pretrained(
            str(self.weights), dtype=dtype, safety_checker=None, requires_safety_checker=False
        ).to(self.device)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(folder))
        pipe.load_textual_inversion(str(folder / "learned_embeds.safetensors"), token="<s*>")
        begin = time.perf_counter()
        out = pipe(
            PROMPT, num_inference_steps=self.args.sample_steps, height=self.resolution, width=self.resolution,
            generator=torch.Generator(self.device).manual_seed(0), output_type="np",
        ).images  # fmt: skip
        wall = time.perf_counter() - begin
        adapters = pipe.get_list_adapters()
        del pipe
        release_free_memory()
        if not np.isfinite(out).all():
            raise FloatingPointError("non-finite images from the plain diffusers pipeline")
        return {
            "adapters": adapters, "wall_s": wall, "shape": list(out.shape),
            "line": f"plain StableDiffusionPipeline + load_lora_weights + load_textual_inversion sampled "
            f"{list(out.shape[1:])} in {wall:.2f} s",
        }  # fmt: skip

    def ddp(self) -> dict[str, Any]:
        devices = self.args.ddp_devices or (torch.cuda.device_count() if self.device.type == "cuda" else 2)
        steps = 2
        overlay = self.pretrain_overlay(steps, "ddp", [], devices)
        extra = _write_yaml(self.work / "ddp_extra.yaml", {"trainer": {"enable_checkpointing": False}})
        cmd = [sys.executable, "train.py", "fit", "--config", str(PRETRAIN), "--config", str(DDP),
               "--config", str(overlay), "--config", str(extra)]  # fmt: skip
        env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        begin = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=self.args.ddp_timeout
        )
        wall = time.perf_counter() - begin
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode}: {proc.stderr[-1500:]}")
        return {
            "devices": devices, "steps": steps, "wall_s": wall,
            "line": f"train.py + configs/trainer/ddp.yaml, {devices} process(es), {steps} steps in {wall:.1f} s",
        }  # fmt: skip


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
