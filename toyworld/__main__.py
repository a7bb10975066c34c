"""The toy world's command line (``python -m toyworld <command> --help`` for each command's options).

python -m toyworld sample-prompts --n 4 --seed 0          # base-distribution prompts as JSON lines
python -m toyworld render --n 16 --seed 0 --out grid.png  # random scenes and their captions
python -m toyworld write-concepts --out assets/toyworld/concepts
python -m toyworld base-adherence --n 256 --seed 0        # the base model's accuracy per attribute
python -m toyworld train checker --config configs/toyworld/checker.yaml   # also: base, clip, image-encoder
python -m toyworld probe-image-encoder --encoder assets/toyworld/image_encoder   # the gate before pretraining
python -m toyworld write-validation-concepts --out assets/toyworld/validation_concepts
python -m toyworld validate-encoder assets/toyworld/encoder/date.ckpt  # encoder-only identity, cores vs none
python -m toyworld export | card | probe --config configs/toyworld/base.yaml   # assemble / card / probe assets
python -m toyworld export-encoder --ckpt .../last.ckpt --name date [--log-dir .../tb]
python -m toyworld figures outputs/eval_toyworld [--concept red_striped_star]
python -m toyworld instance-render --n 16 --seed 0 --out grid.png | instance-concepts --split test
python -m toyworld instance-calibrate      # pixel metric: threshold, reference rows (JSON in assets/toyworld/)
python -m toyworld instance-probe --out probe.json   # the image-branch gate on held-out instances
python -m toyworld instance-oracle --steps 2000   # DIAGNOSTIC: ResNet told every detail (gate upper bound)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from models.weights_only import check_weights_only

PROG = "python -m toyworld"


def _parser() -> argparse.ArgumentParser:
    from toyworld.common.pipeline import CHECKER_DIR, GUIDANCE, PIPELINE_DIR, SAMPLE_STEPS

    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("sample-prompts", help="print N base-distribution prompts as JSON lines")
    p.add_argument("--n", type=int, default=8, help="number of prompts")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    c = sub.add_parser("write-concepts", help="write the held-out concepts' input images and concepts.json")
    c.add_argument("--out", default="assets/toyworld/concepts", help="output folder")
    r = sub.add_parser("render", help="render N random scenes into a PNG grid and print their captions")
    r.add_argument("--n", type=int, default=16, help="number of scenes")
    r.add_argument("--seed", type=int, default=0, help="random seed")
    r.add_argument("--split", choices=["base", "all"], default="all", help="scene distribution")
    r.add_argument("--out", default="toyworld_grid.png", help="output PNG")
    b = sub.add_parser("base-adherence", help="checker accuracy of base-model samples per attribute")
    b.add_argument("--n", type=int, default=256, help="number of prompts")
    b.add_argument("--seed", type=int, default=0, help="prompt and sampling seed")
    b.add_argument("--pipeline", default=str(PIPELINE_DIR), help="base model folder (diffusers layout)")
    b.add_argument("--checker", default=str(CHECKER_DIR), help="attribute checker folder")
    b.add_argument("--steps", type=int, default=SAMPLE_STEPS, help="DDIM steps")
    b.add_argument("--guidance", type=float, default=GUIDANCE, help="classifier-free guidance scale")
    t = sub.add_parser(
        "train", help="train one of the world's models (seeded; base resumes, the others restart)"
    )
    t.add_argument("model", choices=["base", "checker", "clip", "image-encoder"], help="which model")
    t.add_argument(
        "--config", required=True, action="append",
        help="YAML config under configs/toyworld/; repeat it to merge an overlay onto a base (later wins)",
    )  # fmt: skip
    pi = sub.add_parser(
        "probe-image-encoder", help="linear probe of the features DATE's image branch reads (the gate)"
    )
    pi.add_argument("--encoder", default="assets/toyworld/image_encoder", help="image-encoder folder")
    pi.add_argument("--features", default="mean", help="cls | mean | cls_mean (models.encoder.image_tokens)")
    pi.add_argument("--layers", type=int, nargs="*", help="hidden-state indices (default: every 2nd layer)")
    v = sub.add_parser(
        "write-validation-concepts", help="write the validation concepts' images and concepts.json"
    )
    v.add_argument("--out", default="assets/toyworld/validation_concepts", help="output folder")
    ve = sub.add_parser(
        "validate-encoder",
        help="encoder-only identity of a pretraining checkpoint on the validation concepts",
    )
    ve.add_argument(
        "ckpt", help="a pretraining checkpoint (e.g. outputs/pretrain_toyworld/checkpoints/last.ckpt)"
    )
    ve.add_argument(
        "--pretrain-config",
        nargs="+",
        default=["configs/pretrain/toyworld.yaml"],
        help="its pretraining config, then the overlays stacked on it",
    )
    for name, text in (
        ("export", "assemble assets/toyworld/ from the trained models (and measure them)"),
        ("card", "rewrite assets/toyworld/README.md from the measured metrics"),
        ("probe", "checker-read adherence of the current base checkpoint"),
    ):
        sub.add_parser(name, help=text).add_argument(
            "--config", required=True, help="configs/toyworld/base.yaml"
        )
    ei = sub.add_parser(
        "export-instance",
        help="instance world: write assets/toyworld/instance_pipeline/ from its base checkpoint",
    )
    ei.add_argument(
        "--config", required=True, action="append",
        help="configs/toyworld/base.yaml, then configs/toyworld/instance_base.yaml (later wins)",
    )  # fmt: skip
    ia = sub.add_parser(
        "instance-adherence",
        help="instance world: the base model's prompt accuracy and diversity from pixels",
    )
    ia.add_argument("--n", type=int, default=128, help="captions sampled (twice each, two seeds)")
    ia.add_argument("--seed", type=int, default=0, help="caption and sampling seed")
    ia.add_argument(
        "--pipeline", default="assets/toyworld/instance_pipeline", help="base model folder (diffusers layout)"
    )
    ia.add_argument("--out", help="also write the result as JSON here")
    ia.add_argument("--grid", help="also write a PNG: per caption, a training render and the two samples")
    ac = sub.add_parser(
        "instance-ceiling",
        help="instance world: identity of the concepts' inputs after an autoencoder round trip",
    )
    ac.add_argument("--concepts", default="assets/toyworld/instance_concepts", help="concept folder")
    ac.add_argument("--pipeline", default="assets/toyworld/instance_pipeline", help="base model folder")
    e = sub.add_parser(
        "export-encoder", help="write a pretraining checkpoint's weights to assets/toyworld/encoder/"
    )
    e.add_argument("--ckpt", required=True, help="the pretraining checkpoint (e.g. .../last.ckpt)")
    e.add_argument("--name", required=True, help="date or no_regularizer")
    e.add_argument("--log-dir", help="its TensorBoard folder (final curve values)")
    e.add_argument("--fp16", action="store_true", help="store the weights in float16 (half the bytes)")
    e.add_argument(
        "--folder", default="encoder", choices=["encoder", "instance_encoder"], help="under assets/toyworld/"
    )
    f = sub.add_parser(
        "figures", help="copy an evaluation's plots into assets/toyworld/results/ and draw a concept"
    )
    f.add_argument("run", help="the evaluation's out_dir")
    f.add_argument("--concept", default="red_striped_star", help="the concept drawn across methods")
    f.add_argument("--out", default="assets/toyworld/results", help="output folder")
    ir = sub.add_parser(
        "instance-render", help="instance world: N training scenes in a PNG grid, captions printed"
    )
    ir.add_argument("--n", type=int, default=16, help="number of scenes")
    ir.add_argument("--seed", type=int, default=0, help="random seed (batch 0 of the training stream)")
    ir.add_argument("--out", default="instance_grid.png", help="output PNG")
    ic = sub.add_parser(
        "instance-concepts", help="instance world: write a split's concept images and concepts.json"
    )
    ic.add_argument("--split", choices=["test", "validation"], default="test", help="which concept set")
    ic.add_argument(
        "--out",
        help="output folder (default assets/toyworld/instance_concepts or .../instance_validation_concepts)",
    )
    ca = sub.add_parser(
        "instance-calibrate",
        help="instance world: calibrate the pixel identity threshold on validation, score the reference rows",
    )
    ca.add_argument("--prompts", type=int, default=6, help="prompt contexts per concept")
    ca.add_argument("--negatives", type=int, default=3, help="random instances per context (words rows)")
    ca.add_argument(
        "--seed", type=int, default=0, help="seed of contexts, jitter, noise and random instances"
    )
    ca.add_argument("--out", default="assets/toyworld/instance_calibration.json", help="output JSON")
    ip = sub.add_parser(
        "instance-probe", help="instance world: linear probes + 1-NN of image features on held-out instances"
    )
    ip.add_argument(
        "--encoder", nargs="*", default=["assets/toyworld/image_encoder", "assets/toyworld/clip"],
        help="image-encoder folders, one row each (raw pixels are always the last row)",
    )  # fmt: skip
    ip.add_argument("--n-train", type=int, default=1000, help="training-distribution instances (probe fit)")
    ip.add_argument(
        "--n-test", type=int, default=300, help="held-out instances in test cells (2 renders each)"
    )
    ip.add_argument("--n-categories", type=int, default=150, help="held-out-category instances (2 renders)")
    ip.add_argument("--seed", type=int, default=0, help="seed of instances, contexts and jitter")
    ip.add_argument(
        "--cells", choices=["test", "validation"], default="test",
        help="held-out cells probed: test (the gate) or validation (to choose among encoder variants)",
    )  # fmt: skip
    ip.add_argument("--out", help="also write the result as JSON here")
    io = sub.add_parser(
        "instance-oracle",
        help="instance world: a DIAGNOSTIC ResNet trained supervised on every instance detail (gate upper bound)",
    )
    io.add_argument("--steps", type=int, default=2000, help="training steps (96 renders each)")
    io.add_argument("--seed", type=int, default=0, help="seed of weights, instances and contexts")
    io.add_argument(
        "--image-size", type=int, default=64, help="tower input in px (32 px renders, bilinear; >= 32)"
    )
    io.add_argument(
        "--out-dir", default=".cache/toyworld/instance_oracle", help="writes out-dir/image_encoder"
    )
    io.add_argument(
        "--contrastive-weight",
        type=float,
        default=0.0,
        help="weight of SupCon over instances (two contexts = positives) beside the detail heads; 0 = off",
    )
    io.add_argument("--group", type=int, default=1, help="instances of one category per batch group (>= 1)")
    io.add_argument(
        "--one-detail", type=float, default=0.0, help="fraction of groups whose members differ in one detail"
    )
    io.add_argument("--temperature", type=float, default=0.1, help="SupCon temperature (> 0)")
    return parser


INSTANCE_DIRS = {
    "test": "assets/toyworld/instance_concepts",
    "validation": "assets/toyworld/instance_validation_concepts",
}


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("n", "prompts", "negatives"):
        if getattr(args, name, 1) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    configs = getattr(args, "config", None) or []
    for config in [configs] if isinstance(configs, str) else configs:
        if not Path(config).is_file():
            parser.error(f"--config {config} does not exist")
    if args.command == "instance-ceiling":
        if not (Path(args.concepts) / "concepts.json").is_file():
            parser.error(f"--concepts {args.concepts} is not a concept folder (no concepts.json)")
        if not (Path(args.pipeline) / "vae" / "config.json").is_file():
            parser.error(f"--pipeline {args.pipeline} holds no autoencoder (no vae/config.json)")
    if args.command == "instance-adherence":
        if args.n < 2:
            parser.error(f"--n must be >= 2, got {args.n}")
        if not (Path(args.pipeline) / "model_index.json").is_file():
            parser.error(f"--pipeline {args.pipeline} is not a pipeline folder (no model_index.json)")
    if args.command == "base-adherence":
        for name, marker in (("pipeline", "model_index.json"), ("checker", "config.json")):
            if not (Path(getattr(args, name)) / marker).exists():
                parser.error(f"--{name} {getattr(args, name)} is not a {name} folder")
    if args.command == "instance-probe":
        for name in ("n_train", "n_test", "n_categories"):
            if getattr(args, name) < 5:
                parser.error(f"--{name.replace('_', '-')} must be >= 5, got {getattr(args, name)}")
    if args.command == "instance-oracle":
        if args.image_size < 32:
            parser.error(f"--image-size must be >= 32 (the renders are 32 px), got {args.image_size}")
        if args.contrastive_weight < 0 or args.group < 1 or args.temperature <= 0:
            parser.error("--contrastive-weight must be >= 0, --group >= 1 and --temperature > 0")
        if not 0 <= args.one_detail <= 1:
            parser.error(f"--one-detail must be in [0, 1], got {args.one_detail}")
    if args.command in ("probe-image-encoder", "instance-probe"):  # one image-encoder folder, or several
        for folder in [args.encoder] if isinstance(args.encoder, str) else args.encoder:
            if not (Path(folder) / "config.json").is_file():
                parser.error(f"--encoder {folder} is not an image-encoder folder (no config.json)")
    if getattr(args, "ckpt", None) and not Path(args.ckpt).is_dir():  # an encoder folder holds no pickle
        check_weights_only(args.ckpt, parser.error)  # before any work: one line if it could run code
    if args.command == "figures" and not (Path(args.run) / "results.csv").is_file():
        parser.error(f"{args.run} holds no results.csv (an evaluate.py run's out_dir)")


def main(argv: list[str] | None = None) -> None:
    """Runs one command; bad arguments exit with one ``python -m toyworld: error: ...`` line (status 2)."""
    parser = _parser()
    args = parser.parse_args(argv)
    _check_args(parser, args)
    from toyworld.named import world

    if args.command == "write-concepts":
        print(world.write_concepts(args.out))
    elif args.command == "sample-prompts":
        for row in world.sample_prompts(args.n, args.seed):
            sys.stdout.write(json.dumps(row) + "\n")
    elif args.command == "render":
        from evaluation.generate.images import save_grid

        images, scenes = world.render_batch(world.seeded_rng(args.seed, 0x72656E64), args.n, args.split)
        save_grid(images, args.out)
        for s in scenes:
            print(world.caption(s))
        print(f"wrote {args.out}", file=sys.stderr)
    elif args.command == "base-adherence":
        from toyworld.named.measure import base_adherence

        acc = base_adherence(args.n, args.seed, args.pipeline, args.checker, args.steps, args.guidance)
        sys.stdout.write(json.dumps(acc) + "\n")
    elif args.command == "figures":
        from toyworld.release.figures import write_figures

        print(write_figures(Path(args.run), args.concept, Path(args.out)))
    elif args.command == "probe-image-encoder":
        from toyworld.diagnostics.image_probe import probe

        print(json.dumps(probe(args.encoder, args.features, args.layers), indent=1))
    elif args.command == "write-validation-concepts":
        from toyworld.named.validation import write_validation_concepts

        print(write_validation_concepts(args.out))
    elif args.command == "validate-encoder":
        from toyworld.named.validation import measure_checkpoint

        try:  # a checkpoint trained with another config: one line
            print(json.dumps(measure_checkpoint(args.ckpt, args.pretrain_config), indent=1))
        except ValueError as err:
            parser.error(str(err))
    elif args.command == "instance-render":
        from evaluation.generate.images import save_grid
        from toyworld.instance.stream import InstanceWorldStream

        batch = InstanceWorldStream(args.n, seed=args.seed, empty_prob=0.0, drop_prob=0.0).batch(0)
        save_grid(((batch["pixels"].permute(0, 2, 3, 1) + 1) * 127.5).round().byte().numpy(), args.out)
        for c in batch["captions"]:
            print(c)
        print(f"wrote {args.out}", file=sys.stderr)
    elif args.command == "instance-concepts":
        from toyworld.instance.concepts import write_instance_concepts

        print(write_instance_concepts(args.out or INSTANCE_DIRS[args.split], args.split))
    elif args.command == "instance-calibrate":
        _instance_calibrate(args)
    elif args.command == "instance-probe":
        from toyworld.diagnostics.instance_probe import format_table, instance_probe

        result = instance_probe(
            [*args.encoder, "pixels"], args.n_train, args.n_test, args.n_categories, args.seed, args.cells
        )
        print(format_table(result))
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
            print(f"wrote {args.out}", file=sys.stderr)
    elif args.command == "instance-ceiling":
        from toyworld.release.instance_assets import autoencoder_ceiling

        print(json.dumps(autoencoder_ceiling(args.concepts, args.pipeline)))
    elif args.command == "instance-adherence":
        from toyworld.release.instance_assets import instance_adherence

        result = json.dumps(instance_adherence(args.n, args.seed, args.pipeline, grid=args.grid), indent=1)
        if args.out:
            Path(args.out).write_text(result + "\n")
        print(result)
    elif args.command == "instance-oracle":
        from toyworld.diagnostics.oracle import train_oracle

        hybrid = {"contrastive_weight": args.contrastive_weight, "group": args.group}
        hybrid |= {"one_detail": args.one_detail, "temperature": args.temperature}
        print(train_oracle(args.out_dir, args.steps, seed=args.seed, image_size=args.image_size, **hybrid))
    elif args.command == "export-encoder":
        from toyworld.release.assets import export_encoder

        print(export_encoder(args.ckpt, args.name, args.log_dir, folder=args.folder, fp16=args.fp16))
    else:
        _run_config_command(args, parser)


def _instance_calibrate(args: argparse.Namespace) -> None:
    from toyworld.diagnostics import calibration as cal
    from toyworld.instance.pixels import IDENTITY_THRESHOLD

    threshold, balanced = cal.calibrate_threshold()
    table = cal.reference_table(args.prompts, args.seed, args.negatives, threshold)
    table["calibration"] = {
        "threshold": threshold,
        "balanced_accuracy_on_validation": balanced,
        "committed_threshold": IDENTITY_THRESHOLD,
        **cal.CALIBRATION,
    }
    Path(args.out).write_text(json.dumps(table, indent=1) + "\n")
    print(
        f"identity threshold {threshold:.3f} (validation concepts only: same instance vs random same-category "
        f"instances, jitter + noise {cal.CALIBRATION['noise']}; balanced accuracy {balanced:.3f}; "
        f"committed IDENTITY_THRESHOLD {IDENTITY_THRESHOLD:.3f})"
    )
    print(cal.format_table(table))
    print(f"wrote {args.out}", file=sys.stderr)


def _run_config_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from toyworld.training.train import load_config

    cfg = load_config(args.config)
    check_weights_only(Path(cfg.get("out_dir", "")) / "last.pt", parser.error, missing_ok=True)
    if args.command == "train":
        if args.model == "clip":
            from toyworld.training.clip import train_clip

            train_clip(cfg)
        elif args.model == "image-encoder":
            from toyworld.training.image_encoder import train

            print(train(cfg))
        else:
            from toyworld.training.train import train_base, train_checker

            (train_base if args.model == "base" else train_checker)(cfg)
        return
    from toyworld.release import assets

    if args.command == "export-instance":
        from toyworld.release.instance_assets import export_instance

        print(export_instance(cfg))
    elif args.command == "export":
        assets.export(cfg)
    elif args.command == "probe":
        assets.probe(cfg)
    else:
        assets.write_card(assets.ASSETS, cfg)


if __name__ == "__main__":
    main()
