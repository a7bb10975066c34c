"""Cost of both phases at Stable Diffusion 1.5's exact shapes (random weights), through the real LightningModules.

    python -m models.tiny .cache/sd15-shape --config configs/backbone/sd15_shape.yaml   # once, ~2 min, 5.2 GB
    OMP_NUM_THREADS=1 taskset -c 1 python -m benchmarks.real_shape --batched 2   # CPU, bf16, 1 thread, ~45 min
    python -m benchmarks.real_shape --device cuda --threads 0          # a GPU

Phases, each a Lightning ``fit`` of the committed SD 1.5 recipe (configs/pretrain/sd15.yaml, configs/tune/sd15.yaml,
configs/tune/methods/lora.yaml, resolved by ``lightning_modules.cli.resolve_config`` as ``train.py`` reads them) with
the weights pointed at the random SD-1.5-shaped folder and synthetic concept images at 512 px:

1. pretraining, batch 2 (EncoderPretraining);
2. DATE tuning, batch 4 (ConceptTuning, dual path): the encoder prediction (4 noise draws) and the steps;
3. one-shot LoRA (diffusers' train_dreambooth_lora.py recipe, peft), batch 1.

Every phase runs ``--warmup`` untimed steps, then ``--steps`` timed steps (median reported); DATE and LoRA run in
``--rounds`` paired rounds (DATE then LoRA, then LoRA then DATE, ...; each round builds both modules afresh, since
two fp32 SD-1.5-shaped modules do not fit next to each other in 24 GB), and their per-sample ratio is the median of
the per-round ratios. Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (device
synchronised): forward, backward and optimizer step, as this process's CPU time on CPU (with one thread, the work
done, whatever else shares the core; wall times are kept in the JSON) and wall time on a GPU. One more DATE step
(not timed) runs under ``torch.profiler``:
its time split into VAE encode, text encoder (forward), attention layers (forward: both paths and the per-sample
LoRA inside them), the rest of the UNet forward, the backward pass and the rest (optimizer, token lookup, loop), plus
the top operators by self CPU time. Peak memory: see ``benchmarks/common.PeakMemory`` (CPU: resident-set
high-water mark above the level before each step, in one process, so later phases can under-report).
The per-concept costs: DATE = fit start to first step (encoder prediction, optimizer set-up) + 12 x the median
step, LoRA = 500 x the median step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning import Callback, Trainer

from benchmarks.common import machine_notes, markdown_table, rss_bytes
from benchmarks.step_probes import GIB, ProfileStep, StepProbe
from datamodules import ConceptDataModule, ConceptSetDataModule, PretrainDataModule
from datamodules.synthetic import render_concept
from lightning_modules import ConceptTuning
from lightning_modules.cli import resolve_config
from models.tiny import write_tiny_backbone

REPO = Path(__file__).resolve().parents[1]


def _fit(module, data, args, callbacks: list[Callback], steps: int) -> Trainer:
    trainer = Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=callbacks,
    )  # fmt: skip
    trainer.fit(module, data)
    return trainer


def _weights(backbone: Path) -> dict[str, Any]:
    return {
        "model.init_args.pretrained_model_name_or_path": str(backbone),
        "model.init_args.image_encoder_name_or_path": str(backbone),
        "model.init_args.token_index_cache": str(REPO / ".cache" / "token_index"),
        "model.init_args.sample_every_n_steps": 0,
    }


def _timed_steps(probe: StepProbe, warmup: int) -> dict[str, Any]:
    """Medians of the timed steps; ``step_s`` is this process's CPU time on CPU, wall time on a GPU."""
    timed = probe.steps[warmup:]
    return {
        "step_s": statistics.median(s[probe.clock] for s in timed),
        "wall_s": [s["seconds"] for s in timed],
        "steps_s": [s[probe.clock] for s in timed],
        "warmup_s": [s[probe.clock] for s in probe.steps[:warmup]],
        "peak_gib": max(s["peak_gib"] for s in timed),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    backbone = write_tiny_backbone(REPO / args.backbone, REPO / args.backbone_config)
    n = args.warmup + args.steps
    results: dict[str, Any] = {
        "machine": machine_notes(device), "precision": args.precision, "warmup": args.warmup,
        "timed_steps": args.steps, "rounds": args.rounds, "phases": {},
    }  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="real_shape_"))

    # 1. pretraining, batch 2
    cfg = resolve_config([REPO / "configs/pretrain/sd15.yaml"], _weights(backbone))
    probe = StepProbe(device)
    begin = time.perf_counter()
    module = cfg.build_model(probe_size=0)
    load_s = time.perf_counter() - begin
    data = PretrainDataModule(
        roots=None, synthetic_concepts=8, samples_per_concept=max(n, 2), resolution=module.backbone.resolution,
        clip_size=module.backbone.clip_image_size, batch_size=2, num_workers=0,
    )  # fmt: skip
    trainer = _fit(module, data, args, [probe], n if args.pretrain else 1)
    ckpt = work / "encoder.ckpt"
    trainer.save_checkpoint(ckpt)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    if args.pretrain:
        results["phases"]["pretrain"] = {
            "batch": 2, "load_s": load_s, **_timed_steps(probe, args.warmup), "trainable_params": trainable,
        }  # fmt: skip
        print(json.dumps(results["phases"]["pretrain"]), flush=True)
    del module, trainer

    # 2. DATE tuning (encoder prediction + steps), batch 4; 3. one-shot LoRA, batch 1; in paired rounds
    phases = {"date": (None, 4), "lora": ("configs/tune/methods/lora.yaml", 1)}
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        row: dict[str, Any] = {}
        for name in ("date", "lora") if r % 2 == 0 else ("lora", "date"):
            overlay, batch = phases[name]
            configs = [REPO / "configs/tune/sd15.yaml"] + ([REPO / overlay] if overlay else [])
            extra = {
                "model.init_args.export_dir": str(work / name),
                "model.init_args.export_diffusers": False,
            }
            if name == "date":
                extra["model.init_args.encoder_checkpoint"] = str(ckpt)
            module: ConceptTuning = resolve_config(configs, {**_weights(backbone), **extra}).build_model()
            res, clip = module.backbone.resolution, module.backbone.clip_image_size
            probe = StepProbe(device)
            callbacks: list[Callback] = [probe]
            profile = name == "date" and r == args.rounds - 1 and args.profile
            if profile:
                callbacks.append(ProfileStep(n))
            data = ConceptDataModule(
                synthetic_concept=0, resolution=res, clip_size=clip, batch_size=batch, steps=n + int(profile)
            )
            _fit(module, data, args, callbacks, n + int(profile))
            probe.steps = probe.steps[:n]
            row[name] = {
                "batch": batch,
                **_timed_steps(probe, args.warmup),
                "fit_start_to_first_step_wall_s": probe.to_first_step,
                "fit_start_to_first_step_s": (
                    probe.to_first_step_cpu if probe.clock == "cpu_s" else probe.to_first_step
                ),
                "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
            }
            if profile:
                results["profile"] = callbacks[-1].result
            del module
            print(json.dumps({"round": r, name: row[name]}), flush=True)
        row["date_per_sample_vs_lora"] = (row["date"]["step_s"] / 4) / (row["lora"]["step_s"] / 1)
        rounds.append(row)
    results["rounds_detail"] = rounds
    for name in phases:
        results["phases"][name] = {
            "batch": phases[name][1],
            "step_s": statistics.median(x[name]["step_s"] for x in rounds),
            "peak_gib": max(x[name]["peak_gib"] for x in rounds),
            "fit_start_to_first_step_s": statistics.median(
                x[name]["fit_start_to_first_step_s"] for x in rounds
            ),
            "trainable_params": rounds[0][name]["trainable_params"],
        }
    results["date_per_sample_vs_lora"] = statistics.median(x["date_per_sample_vs_lora"] for x in rounds)
    results["peak_rss_gib"] = rss_bytes() / GIB
    date, lora = results["phases"]["date"], results["phases"]["lora"]
    results["per_concept_s"] = {
        "date_prediction_plus_12_steps": date["fit_start_to_first_step_s"] + 12 * date["step_s"],
        "lora_500_steps": 500 * lora["step_s"],
    }
    if args.batched:
        _save(results, args.out)  # the rounds are kept if the larger batch runs out of memory
        results["phases"]["date_batched"] = _batched(args, backbone, ckpt, work, device, n)
        b = results["phases"]["date_batched"]
        per_concept = (b["fit_start_to_first_step_s"] + 12 * b["step_s"]) / b["k"]
        results["per_concept_s"]["date_batched"] = per_concept
    return results


def _batched(args: argparse.Namespace, backbone: Path, ckpt: Path, work: Path, device, n: int) -> dict:
    """DATE tuning of ``args.batched`` synthetic concepts in one run (``ConceptSetDataModule``), batch 4 each."""
    extra = {"model.init_args.export_dir": str(work / "batched"), "model.init_args.export_diffusers": False,
             "model.init_args.encoder_checkpoint": str(ckpt)}  # fmt: skip
    cfg = resolve_config([REPO / "configs/tune/sd15.yaml"], {**_weights(backbone), **extra})
    module: ConceptTuning = cfg.build_model()
    res, clip = module.backbone.resolution, module.backbone.clip_image_size
    folder = work / "batched_images"
    folder.mkdir(exist_ok=True)
    for i in range(args.batched):
        render_concept(0, i, res).save(folder / f"concept_{i}.png")
    data = ConceptSetDataModule(
        images=str(folder), concepts_per_batch=args.batched, resolution=res, clip_size=clip, batch_size=4,
        steps=n,
    )  # fmt: skip
    probe = StepProbe(device)
    _fit(module, data, args, [probe], n)
    out = {
        "k": args.batched, "batch": 4 * args.batched, **_timed_steps(probe, args.warmup),
        "fit_start_to_first_step_s": probe.to_first_step_cpu if probe.clock == "cpu_s" else probe.to_first_step,
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }  # fmt: skip
    print(json.dumps({"date_batched": out}), flush=True)
    return out


def _save(results: dict[str, Any], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(results, indent=2))


def render(results: dict[str, Any]) -> str:
    ph = results["phases"]
    labels = {"pretrain": "pretraining step", "date": "DATE tuning step (dual path)",
              "lora": "one-shot LoRA step (peft)", "date_batched": "DATE tuning step, K concepts batched"}  # fmt: skip
    rows = [
        [labels[k], str(v["batch"]), f"{v['step_s']:.1f}", f"{v['step_s'] / v['batch']:.1f}", f"{v['peak_gib']:.2f}",
         f"{v['trainable_params'] / 1e6:.3f} M"]
        for k, v in ph.items()
    ]  # fmt: skip
    header = ["phase", "batch", "step s (median)", "s per sample", "peak GiB above start", "trainable"]
    cost = results["per_concept_s"]
    d, lo = cost["date_prediction_plus_12_steps"], cost["lora_500_steps"]
    lines = [
        markdown_table(header, rows),
        "",
        f"{results['warmup']} warm-up + {results['timed_steps']} timed steps per phase; DATE/LoRA in "
        f"{results['rounds']} paired rounds; DATE per sample vs LoRA per sample: "
        f"{results['date_per_sample_vs_lora']:.2f}x (median of rounds)",
        f"DATE per concept (fit start to first step {ph['date']['fit_start_to_first_step_s']:.0f} s + 12 steps): "
        f"{d:.0f} s; one-shot LoRA per concept (500 steps): {lo:.0f} s; DATE-12 / LoRA-500 = {d / lo:.4f} "
        f"(1/{lo / d:.1f})",
        f"precision {results['precision']}; process RSS at the end {results['peak_rss_gib']:.1f} GiB",
    ]
    if "date_batched" in cost:
        b = ph["date_batched"]
        lines.append(
            f"DATE with K = {b['k']} concepts batched: {cost['date_batched']:.0f} s per concept "
            f"((fit start to first step {b['fit_start_to_first_step_s']:.0f} s + 12 steps) / K); "
            f"DATE-12 / LoRA-500 = 1/{lo / cost['date_batched']:.1f}"
        )
    if "profile" in results:
        prof = results["profile"]
        total, r = prof["step_s"], prof["ranges_s"]
        attn, text, vae = r["attention_forward"], r["text_encoder_forward"], r["vae_encode"]
        split = [
            ["VAE encode (no grad)", vae],
            ["text encoder forward (soft + hard prompt)", text],
            ["attention layers forward (both paths + per-sample LoRA)", attn],
            ["rest of the UNet forward (resnets, norms, convs)", r["unet_forward"] - attn],
            ["backward (UNet, attention, text encoder for v*)", r["backward"]],
            [
                "rest (optimizer, token lookup, loop, profiler)",
                total - vae - text - r["unet_forward"] - r["backward"],
            ],
        ]
        rows = [[k, f"{v:.1f}", f"{100 * v / total:.0f} %"] for k, v in split]
        lines += ["", f"Profile of one DATE step ({total:.1f} s under the profiler):", "",
                  markdown_table(["part", "s", "share"], rows), ""]  # fmt: skip
        rows = [[o["op"], f"{o['self_s']:.1f}", f"{100 * o['self_s'] / prof['self_total_s']:.0f} %", str(o["calls"])]
                for o in prof["top_ops"][:10]]  # fmt: skip
        lines.append(markdown_table(["operator", "self s", "share of self time", "calls"], rows))
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
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per phase (>= 1)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per phase")
    parser.add_argument("--rounds", type=int, default=2, help="paired DATE / LoRA rounds")
    parser.add_argument(
        "--no-pretrain", dest="pretrain", action="store_false", help="skip timing pretraining"
    )
    parser.add_argument(
        "--no-profile", dest="profile", action="store_false", help="skip the profiled DATE step"
    )
    parser.add_argument(
        "--batched", type=int, default=0, metavar="K",
        help="also time DATE tuning K concepts in one run (K x 4 rows per step; 0: skip)",
    )  # fmt: skip
    parser.add_argument("--out", default="outputs/bench_real_shape.json")
    parser.add_argument("--render", metavar="JSON", help="only print the tables of a saved --out file")
    args = parser.parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.warmup < 0 or args.steps < 1 or args.rounds < 1:
        parser.error("--warmup must be >= 0, --steps and --rounds >= 1")
    if args.batched < 0:
        parser.error(f"--batched must be >= 0, got {args.batched}")
    results = run(args)
    _save(results, args.out)
    print(render(results))


if __name__ == "__main__":
    main()
