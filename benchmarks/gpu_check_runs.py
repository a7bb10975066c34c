"""The checks of the GPU check (``benchmarks/gpu_check.py``): :class:`GpuCheck` holds the state they share
(arguments, folders, the shape's sizes, the tuner) and runs each one: the random weights, pretraining and tuning
through ``train.py``, the evaluation's tuner per concept and batched, sampling, the export reloaded in plain
diffusers, DDP in a subprocess. Also the committed presets, shapes and targets the checks use."""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from benchmarks.common import release_free_memory, sync
from benchmarks.gpu_check_measure import _median, _step_times

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
PROMPT = "a photo of <s*> on a beach"


def _train(args: list[str]):
    """``python train.py <args>`` in this process (the CLI reads ``sys.argv`` too: it must hold no other options)."""
    import train

    argv = sys.argv
    sys.argv = ["train.py"]
    try:
        return train.main(args)
    finally:
        sys.argv = argv


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
        timer = {
            "class_path": "benchmarks.gpu_check_measure.StepTimer",
            "init_args": {"device": str(self.device)},
        }
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
        timer = {
            "class_path": "benchmarks.gpu_check_measure.StepTimer",
            "init_args": {"device": str(self.device)},
        }
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
