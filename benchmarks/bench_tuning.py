"""Benchmarks one tuning step of DATE against one-shot LoRA and textual inversion, and the per-concept cost.

Usage::

    python -m benchmarks.bench_tuning [--configs tiny small25m] [--repeats 5] [--batch-size 4]
                                      [--device cpu|cuda] [--out results.json]

For every backbone config (``configs/backbone/<name>.yaml``, built once into ``.cache/bench/<name>``) and
every method, one optimisation step is forward + backward + AdamW step on the same batch (one concept image,
augmented views, the project's prompt templates) with the same noise and timesteps, built from the same pieces
as ``ConceptTuning.model_step`` (VAE encode, ``losses.add_noise``, nearest token, personalized UNet, losses):

* ``date``: dual path, alpha 0.5; v* and the LoRA cores tuned (``ConceptTuning``'s default); the hard prompt's
  nearest-token lookup and the nearest-neighbour pull (weight 0.01) are part of the step;
* ``lora``: one-shot LoRA: single path (alpha 1), LoRA cores and factors tuned, S* fixed to the word "object";
* ``ti``: textual inversion: single path, v* tuned, no LoRA;
* ``lora_peft`` (opt-in): a static rank-4 peft LoRA on the same projections, as diffusers' LoRA scripts do.

Step times are medians over rounds that interleave the methods in one process (round r runs every method
once, in rotated order), so load changes on a shared machine hit all methods alike. Peak memory is measured per
method in a fresh process (see ``benchmarks.common``). The per-concept cost is DATE's encoder prediction (4 noise
draws) plus 12 steps against 500 one-shot-LoRA steps; when 500 steps would exceed ``--lora-budget-s``, at least
50 are measured and the time is extrapolated linearly (the table says so). Model loading, the one-off
token-index build, Lightning's loop and data loading are excluded. Weights are random: timings do not depend on
them.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from PIL import Image

from benchmarks.common import (
    MIB,
    PeakMemory,
    machine_notes,
    markdown_table,
    ratio,
    rss_bytes,
    run_worker,
    summary,
    timed,
)
from benchmarks.tuning_methods import BASELINE, METHODS, MethodSpec, Tuner  # noqa: F401
from datamodules.synthetic import render_concept
from losses import gather_neighbours
from models.tiny import write_tiny_backbone

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs" / "backbone"
CACHE_DIR = ROOT / ".cache" / "bench"
PERSONALIZER_CONFIG = ROOT / "configs" / "pretrain" / "tiny.yaml"  # module sizes of the tiny recipe


def _setup_worker(args: argparse.Namespace) -> tuple[torch.device, Image.Image, dict]:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    # First held-out concept of the synthetic set, as in configs/tune/tiny.yaml.
    return device, render_concept(args.seed, 60, size=128), machine_notes(device)


def run_memory(args: argparse.Namespace, name: str, key: str) -> dict:
    """Peak memory of ``--memory-steps`` steps after one warm-up step, in this fresh process."""
    device, image, notes = _setup_worker(args)
    tuner = Tuner(key, CACHE_DIR / name, args, image)
    tuner.step(-1)  # one-off first-call costs (kernel set-up, optimizer state) are not per-step memory
    probe = PeakMemory(device)
    probe.start()
    peaks = []
    for s in range(args.memory_steps):
        tuner.step(s)
        peaks.append(probe.peak_bytes())
    return {
        "peak_bytes": max(peaks),
        "per_step_peak_bytes": peaks,
        "rss_after_bytes": rss_bytes(),
        "memory_method": probe.method,
        "machine": notes,
    }


def run_timing(args: argparse.Namespace, name: str) -> dict:
    """Per-step times (interleaved rounds), token lookup, encoder prediction and the per-concept totals."""
    device, image, notes = _setup_worker(args)
    out: dict = {"machine": notes, "methods": {}}
    tuners: dict[str, Tuner] = {}
    for key in args.methods:
        load_s = timed(
            lambda key=key: tuners.__setitem__(key, Tuner(key, CACHE_DIR / name, args, image)), device
        )
        t = tuners[key]
        out["methods"][key] = {
            "label": t.spec.label,
            "load_s": load_s,
            "trainable_params": t.trainable_params(),
            "parity_gap": t.parity_gap(),
        }
    plain = next(t for t in tuners.values() if not t.spec.peft)
    bb = plain.module.backbone
    out["unet_params"] = sum(p.numel() for p in bb.unet.parameters())
    out["attention_layers"] = len(bb.unet.attn_processors)
    with torch.no_grad():
        out["latent_shape"] = list(bb.encode_images(plain.batch["pixel_values"][:1]).shape[1:])

    keys = list(tuners)
    round_s = 0.0
    for w in range(args.warmup):
        round_s = sum(timed(lambda key=key, w=w: tuners[key].step(-1 - w), device) for key in keys)
    rounds = max(args.repeats, math.floor(args.step_budget_s / round_s) if round_s > 0 else 0)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for r in range(rounds):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            times[key].append(timed(lambda key=key, r=r: tuners[key].step(r), device))
    for key in keys:
        out["methods"][key] |= {"step_s": summary(times[key]), "step_s_raw": times[key]}
        if BASELINE in times:  # paired by round: a slowdown of the machine hits both terms of a ratio
            paired = [a / b for a, b in zip(times[key], times[BASELINE])]
            out["methods"][key]["vs_baseline_paired"] = summary(paired)

    if "date" in tuners:
        d = tuners["date"]
        v = d.module.v_star.detach().expand(args.batch_size, -1)
        table = d.module.backbone.token_embedding_table()
        lookup = [
            timed(lambda: gather_neighbours(d.module.token_index, table, v, 1), device) for _ in range(20)
        ]
        out["token_lookup_s"] = summary(lookup)
        step_median = out["methods"]["date"]["step_s"]["median"]
        enc = [timed(d.init_concept, device)]
        repeats = max(
            1,
            min(
                args.concept_repeats,
                math.floor(args.date_budget_s / (enc[0] + args.date_steps * step_median)),
            ),
        )

        def concept(c: int) -> None:
            enc.append(timed(d.init_concept, device))
            d.reset_optimizer()
            for s in range(args.date_steps):
                d.step(10_000 + 100 * c + s)

        totals = [timed(lambda c=c: concept(c), device) for c in range(repeats)]
        out["encoder_prediction_s"] = summary(enc)
        out["date_concept"] = {
            "steps": args.date_steps,
            "total_s": summary(totals),
            "from_step_medians_s": summary(enc)["median"] + args.date_steps * step_median,
        }
    if BASELINE in tuners:
        b = tuners[BASELINE]
        median = out["methods"][BASELINE]["step_s"]["median"]
        n = min(args.lora_steps, max(50, math.floor(args.lora_budget_s / median)))
        b.init_concept()
        b.reset_optimizer()
        measured = timed(lambda: [b.step(20_000 + s) for s in range(n)], device)
        out["lora_concept"] = {
            "steps": args.lora_steps,
            "measured_steps": n,
            "measured_s": measured,
            "total_s": measured * args.lora_steps / n,
            "extrapolated": n < args.lora_steps,
            "from_step_medians_s": args.lora_steps * median,
        }
    return out


# ----- parent: builds the backbones, runs the workers in fresh processes, prints the tables
FORWARDED = "device threads batch_size repeats step_budget_s warmup memory_steps date_steps lora_steps concept_repeats"
FORWARDED += " date_budget_s lora_budget_s seed"


def _spawn(args: argparse.Namespace, kind: str, name: str, methods: list[str]) -> dict:
    """Runs a ``kind`` worker for config ``name`` in a fresh Python process; returns its JSON result."""
    argv = ["--worker", kind, "--configs", name, "--methods", *methods]
    for flag in FORWARDED.split():
        argv += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    return run_worker("benchmarks.bench_tuning", argv, ROOT)


def _paired(m: dict) -> str | None:
    p = m.get("vs_baseline_paired")
    return p and f"{p['median']:.2f}x [{p['q1']:.2f}-{p['q3']:.2f}]"


def render(name: str, res: dict, args: argparse.Namespace) -> str:
    """The markdown report of one config: per-step table, per-concept table, notes."""
    t, mem = res["timing"], res["memory"]
    methods = t["methods"]
    base_s = methods.get(BASELINE, {}).get("step_s", {}).get("median")
    base_mem = mem.get(BASELINE, {}).get("peak_bytes")
    lines = [
        f"### {name}: UNet {t['unet_params'] / 1e6:.2f} M parameters, {t['attention_layers']} attention "
        f"layers, latents {'x'.join(map(str, t['latent_shape']))}, batch {args.batch_size}, {args.device} "
        f"({t['machine']['torch_threads']} torch threads)\n"
    ]
    rows = []
    for key, m in methods.items():
        s, peak = m["step_s"], mem.get(key, {}).get("peak_bytes")
        rows.append(
            [
                m["label"],
                f"{m['trainable_params']:,}",
                f"{1e3 * s['median']:.0f} [{1e3 * s['q1']:.0f}-{1e3 * s['q3']:.0f}]",
                _paired(m) or ratio(s["median"], base_s),
                "n/a" if peak is None else f"{peak / MIB:.0f}",
                ratio(peak, base_mem),
            ]
        )
    header = [
        "method",
        "trainable params",
        f"ms / step, median [IQR] of {next(iter(methods.values()))['step_s']['n']}",
        "time vs one-shot LoRA, median [IQR] of per-round ratios",
        "peak memory (MiB)",
        "memory vs one-shot LoRA",
    ]
    lines.append(markdown_table(header, rows))
    if "date_concept" in t and "lora_concept" in t:
        dc, lc = t["date_concept"], t["lora_concept"]
        how = "all steps measured"
        if lc["extrapolated"]:
            how = f"{lc['measured_s']:.1f} s for {lc['measured_steps']} steps, extrapolated linearly"
        r = dc["total_s"]["median"] / lc["total_s"]
        rows = [
            [
                f"DATE: encoder prediction (4 noise draws) + {dc['steps']} steps",
                f"{dc['total_s']['median']:.2f}",
                f"median of {dc['total_s']['n']} runs" if dc["total_s"]["n"] > 1 else "1 run",
                f"{dc['from_step_medians_s']:.2f}",
            ],
            [
                f"one-shot LoRA: {lc['steps']} steps",
                f"{lc['total_s']:.1f}",
                how,
                f"{lc['from_step_medians_s']:.1f}",
            ],
            [
                f"**DATE-{dc['steps']} / LoRA-{lc['steps']}**",
                f"**{r:.4f}**",
                f"LoRA-{lc['steps']} takes {1 / r:.0f}x longer",
                f"{dc['from_step_medians_s'] / lc['from_step_medians_s']:.4f}",
            ],
        ]
        lines += ["", markdown_table(["per-concept cost", "seconds", "how", "from step medians (s)"], rows)]
    notes = []
    if "token_lookup_s" in t:
        notes.append(
            f"token lookup (FAISS exact, {args.batch_size} queries): "
            f"{1e3 * t['token_lookup_s']['median']:.2f} ms of each DATE step"
        )
    if "encoder_prediction_s" in t:
        notes.append(f"encoder prediction: {1e3 * t['encoder_prediction_s']['median']:.0f} ms")
    notes.append(
        f"loss vs ConceptTuning.model_step: max |gap| {max(m['parity_gap'] for m in methods.values()):.1e}"
    )
    if mem:
        notes.append("memory: " + next(iter(mem.values()))["memory_method"])
    return "\n".join([*lines, "", "; ".join(notes) + "."])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "small25m"], help="names in configs/backbone/")
    p.add_argument("--methods", nargs="+", default=["date", "lora", "ti"], choices=list(METHODS))
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (one step per method) at least")
    p.add_argument(
        "--step-budget-s",
        type=float,
        default=30.0,
        help="more rounds while they fit in this time (cheap configs)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per method first")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch intra-op threads (0: 1 on CPU, steadier on a shared machine; torch's default on CUDA)",
    )
    p.add_argument(
        "--memory-steps", type=int, default=2, help="measured steps per fresh process for peak memory"
    )
    p.add_argument("--date-steps", type=int, default=12)
    p.add_argument("--lora-steps", type=int, default=500)
    p.add_argument(
        "--concept-repeats",
        type=int,
        default=3,
        help="DATE per-concept runs (median); fewer where they would exceed --date-budget-s",
    )
    p.add_argument(
        "--date-budget-s", type=float, default=60.0, help="time for DATE per-concept runs (>= 1 run)"
    )
    p.add_argument(
        "--lora-budget-s",
        type=float,
        default=120.0,
        help="time for the LoRA per-concept run: where all steps would take longer, fewer (>= 50) "
        "are measured and the total extrapolated linearly",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached backbones")
    p.add_argument("--render", metavar="JSON", help="only print the tables of a saved --out file")
    p.add_argument("--worker", choices=["timing", "memory"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.threads == 0 and args.device == "cpu":
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        name = args.configs[0]
        res = run_timing(args, name) if args.worker == "timing" else run_memory(args, name, args.methods[0])
        Path(args.worker_out).write_text(json.dumps(res))
        return
    if args.render:
        saved = json.loads(Path(args.render).read_text())
        for name, res in saved["configs"].items():
            print(render(name, res, argparse.Namespace(**saved["args"])) + "\n")
        return
    results: dict = {
        "args": vars(args),
        "methods": {k: asdict(METHODS[k]) for k in args.methods},
        "configs": {},
    }
    for name in args.configs:
        print(f"[{name}] backbone in {CACHE_DIR / name}; timing {', '.join(args.methods)}", file=sys.stderr)
        write_tiny_backbone(CACHE_DIR / name, CONFIG_DIR / f"{name}.yaml", overwrite=args.rebuild)
        res = {"timing": _spawn(args, "timing", name, args.methods), "memory": {}}
        for key in args.methods:
            print(f"[{name}] peak memory of {key}", file=sys.stderr)
            res["memory"][key] = _spawn(args, "memory", name, [key])
        results["configs"][name] = res
        print(render(name, res, args) + "\n", flush=True)
        if args.out:  # after every config, so a long run leaves partial results
            Path(args.out).write_text(json.dumps(results, indent=2))
    if args.out:
        print(f"results written to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
