"""Concepts per hour: K concepts tuned in one batched run against K sequential single-concept runs.

Usage::

    python -m benchmarks.bench_batched [--configs tiny small25m toyworld] [--ks 1 4 16 64] [--steps 12]
                                       [--repeats 2] [--device cpu|cuda] [--out results.json]

For every config and every K, the same total work (K concepts x ``--steps`` steps x ``--batch-size`` views,
DATE: dual path, alpha 0.5, tuning what the config's tuning YAML tunes or ``--tune`` says: ``tiny`` and
``small25m`` v* and the cores, the toy world v*, the cores and the LoRA factors, a copy per concept when batched)
is done twice per round, in alternating order:

* **batched**: one ``trainer.fit`` of ``ConceptTuning`` on a ``ConceptSetDataModule`` holding the K images with
  ``concepts_per_batch = K`` (one batch = K x B rows);
* **sequential**: K ``trainer.fit`` runs of the SAME module on a ``ConceptDataModule`` each (as the evaluation
  harness tunes: the backbone is loaded once, each concept pays its own Trainer, set-up and export).

The module is moved to the device once and stays there across fits (``lightning_modules.resident``: Lightning's
own teardown would copy the whole backbone to the host after every fit, inside the sequential rows' time), so the
memory baseline of each run is taken with the model already on the device.

Both include each concept's encoder prediction (4 noise draws) and artefact export; neither includes loading the
model (reported once as ``load_s``). Times are this process's CPU seconds on CPU (one torch thread: the work
done, robust to other jobs on a shared core; wall times are kept in the JSON) and wall seconds on a GPU.
After ``--warmup`` untimed rounds of K = 1, ``--repeats`` rounds are timed;
the speed-up is the median of the per-round ratios. Peak memory: the peak above the level before each batched
run (CPU: resident set; CUDA: allocated tensors; see ``benchmarks.common.PeakMemory``), divided by K.

Configs: ``tiny`` and ``small25m`` are ``configs/backbone/<name>.yaml`` built into ``.cache/bench/<name>``
with random weights and a random-weight encoder checkpoint (timings do not depend on the weights); ``toyworld``
is the committed toy world (``configs/tune/toyworld.yaml``: its pipeline and DATE encoder). Concept images:
synthetic concepts (tiny, small25m) or the committed toy-world concepts, reused under new names past 10.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from lightning import Trainer

from benchmarks.common import MIB, PeakMemory, machine_notes, markdown_table, timed, timed_cpu
from datamodules import ConceptDataModule, ConceptSetDataModule
from datamodules.synthetic import render_concept
from lightning_modules.checkpoint import CHECKPOINT_KEY
from lightning_modules.cli import resolve_config
from lightning_modules.resident import ResidentStrategy
from models.tiny import write_tiny_backbone

ROOT = Path(__file__).resolve().parents[1]
CACHE_DIR = ROOT / ".cache" / "bench"
TOY_CONCEPTS = ROOT / "assets" / "toyworld" / "concepts"


def _random_encoder_checkpoint(cfg, sd_dir: Path, path: Path) -> Path:
    """A pretraining checkpoint of the (randomly initialised) personalizer of ``cfg`` on ``sd_dir``."""
    if path.is_file():
        return path
    sizes = resolve_config([ROOT / "configs" / "pretrain" / "tiny.yaml"]).model_kwargs["personalizer"]
    module = cfg.build_model(
        pretrained_model_name_or_path=str(sd_dir), image_encoder_name_or_path=str(sd_dir), encoder_checkpoint=None,
        init="zero", token_index_cache=None, personalizer=sizes,
    )  # fmt: skip
    meta = {**module.checkpoint_metadata(), "phase": "pretrain"}
    state = {f"personalizer.{k}": v for k, v in module.personalizer.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({CHECKPOINT_KEY: meta, "state_dict": state}, path)
    return path


def _setup(name: str, args: argparse.Namespace, work: Path):
    """(resolved config, module-argument overrides, data-argument overrides, K images folder) of a config."""
    if name == "toyworld":
        cfg = resolve_config([ROOT / "configs" / "tune" / "toyworld.yaml"])
        model, entries = {}, json.loads((TOY_CONCEPTS / "concepts.json").read_text())
        sources = [(TOY_CONCEPTS / e["image"], e["class_noun"], e["template"]) for e in entries]
    else:
        sd_dir = write_tiny_backbone(CACHE_DIR / name, ROOT / "configs" / "backbone" / f"{name}.yaml")
        cfg = resolve_config([ROOT / "configs" / "tune" / "tiny.yaml"])
        ckpt = _random_encoder_checkpoint(cfg, sd_dir, CACHE_DIR / f"{name}_random_encoder.ckpt")
        model = {
            "pretrained_model_name_or_path": str(sd_dir), "image_encoder_name_or_path": str(sd_dir),
            "encoder_checkpoint": str(ckpt),
        }  # fmt: skip
        sources = []
        for i in range(max(args.ks)):
            path = work / "sources" / f"synthetic_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            render_concept(args.seed, i, size=128).save(path)
            sources.append((path, None, None))
    if args.tune:
        model["tune"] = list(args.tune)
    model |= {"token_index_cache": str(CACHE_DIR / "token_index"), "export_diffusers": False,
              "export_dir": str(work / "concepts"), "seed": args.seed}  # fmt: skip
    lines = []
    for i in range(max(args.ks)):
        src, noun, template = sources[i % len(sources)]
        dst = work / "images" / f"c{i:03d}{src.suffix}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
        lines.append("\t".join([str(dst), noun or "", template or ""]).rstrip("\t"))
    data = {
        k: v
        for k, v in cfg.data_kwargs.items()
        if k in ("resolution", "clip_size", "scale", "flip_p", "seed")
    }
    data |= {"batch_size": args.batch_size, "steps": args.steps, "seed": args.seed}
    return cfg, model, data, lines


def _trainer(args: argparse.Namespace) -> Trainer:
    return Trainer(
        accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=args.precision,
        strategy=ResidentStrategy(args.device), max_steps=-1, max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip


def run_config(name: str, args: argparse.Namespace) -> dict:
    """Timings and memory of one config for every K."""
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix=f"bench_batched_{name}_"))
    cfg, model_args, data_args, lines = _setup(name, args, work)
    holder: dict = {}
    load_s = timed(lambda: holder.setdefault("m", cfg.build_model(**model_args)), device)
    module = holder["m"].to(device)
    # the images' sizes follow the backbone built (a config's tuning YAML names one backbone's sizes)
    data_args |= {"resolution": module.backbone.resolution, "clip_size": module.backbone.clip_image_size}

    def batched(k: int) -> None:
        listing = work / f"k{k}.txt"
        listing.write_text("\n".join(lines[:k]) + "\n")
        module.reset_concept()
        _trainer(args).fit(
            module, ConceptSetDataModule(images=str(listing), concepts_per_batch=k, **data_args)
        )

    def sequential(k: int) -> None:
        for line in lines[:k]:
            path, *rest = line.split("\t")
            extra = {"class_noun": rest[0] or None} if rest else {}
            if len(rest) > 1:
                extra["templates"] = [rest[1]]
            module.reset_concept()
            _trainer(args).fit(module, ConceptDataModule(image=path, **data_args, **extra))

    for _ in range(args.warmup):
        batched(1)
        sequential(1)
    out: dict = {"load_s": load_s, "machine": machine_notes(device), "tune": list(module.tune), "ks": {}}
    for k in args.ks:
        runs: dict[str, list[float]] = {"batched": [], "sequential": []}
        walls: dict[str, list[float]] = {"batched": [], "sequential": []}
        peaks = []
        for r in range(args.repeats):
            order = ("batched", "sequential") if r % 2 == 0 else ("sequential", "batched")
            for kind in order:
                probe = PeakMemory(device)
                probe.start()
                wall, cpu = timed_cpu(
                    lambda kind=kind, k=k: (batched if kind == "batched" else sequential)(k), device
                )
                runs[kind].append(cpu if device.type == "cpu" else wall)
                walls[kind].append(wall)
                if kind == "batched":
                    peaks.append(probe.peak_bytes())
        ratios = [s / b for s, b in zip(runs["sequential"], runs["batched"])]
        b_s, s_s = statistics.median(runs["batched"]), statistics.median(runs["sequential"])
        out["ks"][str(k)] = {
            "batched_s": runs["batched"], "sequential_s": runs["sequential"], "wall_s": walls,
            "batched_concepts_per_hour": 3600 * k / b_s, "sequential_concepts_per_hour": 3600 * k / s_s,
            "speedup_paired_median": statistics.median(ratios), "peak_bytes": max(peaks),
            "peak_bytes_per_concept": max(peaks) / k, "memory_method": probe.method,
        }  # fmt: skip
        print(f"[{name}] K={k}: {json.dumps(out['ks'][str(k)])}", file=sys.stderr, flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return out


def render(results: dict) -> str:
    a = results["args"]
    lines = []
    for name, res in results["configs"].items():
        m = res["machine"]
        lines.append(
            f"#### {name}: {a['steps']} steps x batch {a['batch_size']} per concept, tuning "
            f"{'+'.join(res.get('tune', ['(not recorded)']))}, {a['device']} "
            f"({m['torch_threads']} torch threads), {a['precision']}, {a['repeats']} paired rounds, "
            f"model load {res['load_s']:.1f} s (not counted)\n"
        )
        rows = [
            [k, f"{r['batched_concepts_per_hour']:.0f}", f"{r['sequential_concepts_per_hour']:.0f}",
             f"{r['speedup_paired_median']:.2f}x", f"{statistics.median(r['batched_s']):.1f}",
             f"{statistics.median(r['sequential_s']):.1f}", f"{r['peak_bytes_per_concept'] / MIB:.0f}"]
            for k, r in res["ks"].items()
        ]  # fmt: skip
        header = ["K", "batched concepts/h", "sequential concepts/h", "speed-up (median of rounds)",
                  "batched s", "sequential s", "peak MiB per concept (batched)"]  # fmt: skip
        lines += [markdown_table(header, rows), ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=["tiny", "small25m", "toyworld"])
    p.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16])
    p.add_argument("--steps", type=int, default=12, help="tuning steps per concept")
    p.add_argument(
        "--tune", nargs="+", default=None, metavar="PART",
        help="what the steps tune (embedding, cores, factors); default: each config's tuning YAML",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, default=4, help="views per concept and step")
    p.add_argument("--repeats", type=int, default=2, help="timed paired rounds per K")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds of K = 1 first")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--precision", default="32-true", help="Lightning precision (e.g. bf16-mixed on a GPU)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: leave as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write all results as JSON here")
    p.add_argument("--render", metavar="JSON", help="only print the tables of a saved --out file")
    args = p.parse_args(argv)
    if min(args.ks) < 1 or args.steps < 1 or args.repeats < 1:
        p.error("--ks, --steps and --repeats must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.render:
        print(render(json.loads(Path(args.render).read_text())))
        return
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    for logger in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(logger).setLevel(logging.ERROR)
    results: dict = {"args": vars(args), "configs": {}}
    for name in args.configs:
        results["configs"][name] = run_config(name, args)
        if args.out:  # after every config, so a long run leaves partial results
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2))
    print(render(results))


if __name__ == "__main__":
    main()
