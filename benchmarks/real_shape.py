"""Cost of both phases at Stable Diffusion 1.5's exact shapes (random weights), through the real LightningModules.

    python -m models.tiny .cache/sd15-shape --config configs/backbone/sd15_shape.yaml   # once, ~48 s, 5.2 GB
    python -m benchmarks.real_shape                        # CPU, bf16 autocast, 1 thread (~12 GB RAM, minutes)
    python -m benchmarks.real_shape --device cuda          # a GPU

Phases, each one Lightning ``fit`` of the committed SD 1.5 recipe (configs/pretrain/sd15.yaml,
configs/tune/sd15.yaml, configs/tune/sd15_lora.yaml) with the weights pointed at the random SD-1.5-shaped folder
and synthetic concept images at 512 px:

1. pretraining: one step, batch 2 (EncoderPretraining);
2. DATE tuning: the encoder prediction (4 noise draws) and one step, batch 4 (ConceptTuning, dual path);
3. one-shot LoRA (diffusers' train_dreambooth_lora.py recipe): one step, batch 1.

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (device synchronised) and is the
first step of its run (it includes first-call overheads). Peak memory: see ``benchmarks/common.PeakMemory``
(CPU: resident-set high-water mark above the level before the step, in one process for all phases, so later
phases can under-report by memory glibc kept for reuse). The per-concept costs are extrapolated from the
measured single steps: DATE = prediction + 12 steps, LoRA = 500 steps.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer
from omegaconf import OmegaConf

from benchmarks.common import PeakMemory, machine_notes, markdown_table, rss_bytes, sync
from datamodules import ConceptDataModule, PretrainDataModule
from evaluation.tuning import _optimizer_factory
from lightning_modules import ConceptTuning, EncoderPretraining
from models.personalizer import PersonalizerConfig
from models.tiny import write_tiny_backbone

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


class StepProbe(Callback):
    """Wall time and peak memory of every training step, and the time from fit start to the first step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.to_first_step = 0.0

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start = time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.to_first_step = time.perf_counter() - self._fit_start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._probe = PeakMemory(self.device)
        self._probe.start()
        sync(self.device)
        self._begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        seconds = time.perf_counter() - self._begin
        self.steps.append({"seconds": seconds, "peak_gib": self._probe.peak_bytes() / GIB})


def _model_kwargs(config: str, overlay: str | None, backbone: Path, extra: dict[str, Any]) -> dict[str, Any]:
    cfg = OmegaConf.load(REPO / config)
    if overlay:
        cfg = OmegaConf.merge(cfg, OmegaConf.load(REPO / overlay))
    kwargs = dict(OmegaConf.to_container(cfg, resolve=True)["model"]["init_args"])
    kwargs["optimizer"] = _optimizer_factory(kwargs.get("optimizer"))
    if isinstance(kwargs.get("personalizer"), dict):
        kwargs["personalizer"] = PersonalizerConfig(**kwargs["personalizer"])
    kwargs.update(
        pretrained_model_name_or_path=str(backbone),
        image_encoder_name_or_path=str(backbone),
        token_index_cache=str(REPO / ".cache" / "token_index"),
        sample_every_n_steps=0,
        **extra,
    )
    return kwargs


def _fit(module, data, args, probe: StepProbe) -> Trainer:
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu",
        devices=1,
        precision=args.precision,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
    )
    trainer.fit(module, data)
    return trainer


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    backbone = write_tiny_backbone(REPO / args.backbone, REPO / args.backbone_config)
    results: dict[str, Any] = {"machine": machine_notes(device), "precision": args.precision, "phases": {}}
    work = Path(tempfile.mkdtemp(prefix="real_shape_"))

    # 1. pretraining, batch 2
    probe = StepProbe(device)
    begin = time.perf_counter()
    module = EncoderPretraining(
        **_model_kwargs("configs/pretrain/sd15.yaml", None, backbone, {"probe_size": 0})
    )
    load_s = time.perf_counter() - begin
    data = PretrainDataModule(
        roots=None, synthetic_concepts=8, samples_per_concept=2, resolution=module.backbone.resolution,
        clip_size=module.backbone.clip_image_size, batch_size=2, num_workers=0,
    )  # fmt: skip
    trainer = _fit(module, data, args, probe)
    ckpt = work / "encoder.ckpt"
    trainer.save_checkpoint(ckpt)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    results["phases"]["pretrain"] = {
        "batch": 2, "load_s": load_s, **probe.steps[0], "trainable_params": trainable,
        "checkpoint_mib": ckpt.stat().st_size / 2**20,
    }  # fmt: skip
    del module, trainer
    print(json.dumps(results["phases"]["pretrain"]), flush=True)

    # 2. DATE tuning (encoder prediction + one step), batch 4; 3. one-shot LoRA, batch 1
    for name, overlay, batch in (("date", None, 4), ("lora", "configs/tune/sd15_lora.yaml", 1)):
        probe = StepProbe(device)
        extra = {"export_dir": str(work / name), "export_diffusers": False}
        if name == "date":
            extra["encoder_checkpoint"] = str(ckpt)
        module = ConceptTuning(**_model_kwargs("configs/tune/sd15.yaml", overlay, backbone, extra))
        res, clip = module.backbone.resolution, module.backbone.clip_image_size
        data = ConceptDataModule(
            synthetic_concept=0, resolution=res, clip_size=clip, batch_size=batch, steps=1
        )
        _fit(module, data, args, probe)
        results["phases"][name] = {
            "batch": batch, **probe.steps[0], "fit_start_to_first_step_s": probe.to_first_step,
            "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        }  # fmt: skip
        del module
        print(json.dumps(results["phases"][name]), flush=True)
    results["peak_rss_gib"] = rss_bytes() / GIB
    date, lora = results["phases"]["date"], results["phases"]["lora"]
    results["per_concept_s"] = {
        "date_prediction_plus_12_steps": date["fit_start_to_first_step_s"] + 12 * date["seconds"],
        "lora_500_steps": 500 * lora["seconds"],
    }
    return results


def render(results: dict[str, Any]) -> str:
    ph = results["phases"]
    rows = [
        ["pretraining step", str(ph["pretrain"]["batch"]), f"{ph['pretrain']['seconds']:.1f}",
         f"{ph['pretrain']['peak_gib']:.2f}", f"{ph['pretrain']['trainable_params'] / 1e6:.1f} M"],
        ["DATE tuning step (dual path)", str(ph["date"]["batch"]), f"{ph['date']['seconds']:.1f}",
         f"{ph['date']['peak_gib']:.2f}", f"{ph['date']['trainable_params'] / 1e6:.3f} M"],
        ["one-shot LoRA step (peft)", str(ph["lora"]["batch"]), f"{ph['lora']['seconds']:.1f}",
         f"{ph['lora']['peak_gib']:.2f}", f"{ph['lora']['trainable_params'] / 1e6:.2f} M"],
    ]  # fmt: skip
    table = markdown_table(["phase", "batch", "step s", "peak GiB above start", "trainable"], rows)
    cost = results["per_concept_s"]
    lines = [
        table,
        "",
        f"DATE per concept (fit start to first step: the encoder prediction of 4 noise draws and optimizer set-up, "
        f"+ 12 x the measured step): {cost['date_prediction_plus_12_steps']:.0f} s (extrapolated)",
        f"one-shot LoRA per concept (500 x the measured step): {cost['lora_500_steps']:.0f} s (extrapolated)",
        f"precision {results['precision']}; process RSS at the end {results['peak_rss_gib']:.1f} GiB",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbone", default=".cache/sd15-shape", help="SD-1.5-shaped folder (built if missing)"
    )
    parser.add_argument("--backbone-config", default="configs/backbone/sd15_shape.yaml", help="its shapes")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--precision", default="bf16-mixed", help="Lightning precision (the SD configs' value)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    parser.add_argument("--out", default="outputs/bench_real_shape.json")
    args = parser.parse_args(argv)
    results = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()
