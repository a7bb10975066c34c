"""The model card's lines for the committed encoders and the instance world (``toyworld.release.assets.write_card``),
from the JSON files measured with them."""

from __future__ import annotations

import json
from pathlib import Path

NAMED_ENCODERS = {
    "date": "configs/pretrain/toyworld.yaml",
    "no_regularizer": "configs/pretrain/toyworld.yaml + configs/experiments/no_regularizer/pretrain_toyworld.yaml",
    "date_modules": "configs/pretrain/toyworld.yaml + configs/experiments/toyworld/pretrain_modules.yaml",
    "no_regularizer_modules": "configs/pretrain/toyworld.yaml + configs/experiments/toyworld/pretrain_modules.yaml"
    " + configs/experiments/no_regularizer/pretrain_toyworld_modules.yaml",
}


def encoder_lines(out: Path, folder: str = "encoder", configs: dict[str, str] = NAMED_ENCODERS) -> list[str]:
    """Model-card lines for the committed encoders in ``out / folder``: steps and first / final values of their
    training curves (``configs``: checkpoint name -> the config that trained it)."""
    lines = []
    for name, config in configs.items():
        path = out / folder / f"{name}.json"
        if not path.exists():
            continue
        info = json.loads(path.read_text())
        curves = info.get("curves", {})
        parts = [
            f"{tag.removeprefix('train/')} {c['first']:.3f} -> {c['mean_last_20']:.3f}"
            for tag, c in sorted(curves.items())
            if tag.startswith("train/loss")
        ]
        lines.append(
            f"- `{folder}/{name}.ckpt` (`{config}`, {info.get('global_step')} steps, batch 16): first logged value"
            f" -> mean of the last 20 logged values: " + "; ".join(parts) + "."
        )
        if info.get("validation"):
            curve = ", ".join(
                f"{r['step']}: {r.get('identity_a1', float('nan')):.2f} / {r.get('identity_a0.5', float('nan')):.2f}"
                for r in info["validation"]
            )
            lines.append(f"  Validation identity (encoder only, alpha 1 / 0.5) by step: {curve}.")
    return lines


INSTANCE_ENCODERS = {
    "date": "configs/pretrain/instance.yaml",
    "date_modules": "configs/pretrain/instance.yaml + configs/pretrain/instance_modules.yaml"
    " --model.init_args.personalizer.hyper_hidden_dim 16",
    "date_modules_trunk64": "configs/pretrain/instance.yaml + configs/pretrain/instance_modules.yaml",
}


def instance_lines(out: Path) -> list[str]:
    """Model-card lines for the instance world's assets (``toyworld.release.assets.write_card``), from the JSON files
    measured with them."""

    def load(name: str) -> dict:
        path = out / name
        return json.loads(path.read_text()) if path.exists() else {}

    base, adh, cal = (
        load(n)
        for n in (
            "instance_pipeline/train_summary.json",
            "instance_adherence.json",
            "instance_calibration.json",
        )
    )
    lines = [
        "## The instance world (captions name a category and a context, never the instance's details)",
        "What it is and what was measured with it: docs/toyworld.md and docs/research/instance_world.md.",
        f"- `instance_pipeline/`: the base model trained on instance scenes for {base.get('base_steps')} steps"
        f" (final loss {base.get('base_final_loss', float('nan')):.4f},"
        f" {base.get('base_wall_s_last_run', 0) / 60:.0f} min on one core; VAE reconstruction MSE"
        f" {base.get('vae_rec_mse', float('nan')):.4f}). It holds the UNet, VAE and scheduler; text encoder,"
        " tokenizer and image encoder link to `../pipeline/`. Samples of"
        f" {adh.get('n')} captions (`python -m toyworld instance-adherence --n {adh.get('n')} --seed"
        f" {adh.get('seed')}`): prompt accuracy {adh.get('prompt_accuracy', {}).get('all', float('nan')):.3f};"
        f" identity of two seeds of one caption {adh.get('same_caption_two_seeds_identity', float('nan')):.3f},"
        f" of one instance rendered in two contexts {adh.get('renders_same_instance_identity', float('nan')):.3f},"
        f" of two instances of a category {adh.get('renders_same_category_identity', float('nan')):.3f}.",
    ]
    for name, what in (
        ("instance_image_encoder", "instance pairs only"),
        ("instance_image_encoder_hybrid", "SupCon over instance pairs + detail heads; DATE's image branch"),
    ):
        rows, train = load(f"{name}/probe.json").get("rows", []), load(f"{name}/train.json")
        if not rows:
            continue
        cells = rows[0]["cells"]
        probe = ", ".join(f"{k} {v:.2f}" for k, v in cells.items() if k not in ("n", "distractors", "1nn_z"))
        lines.append(
            f"- `{name}/` ({what}; {train.get('steps')} steps, {train.get('wall_s')} s): linear probe on held-out"
            f" cells (1nn: the same instance among {cells.get('distractors')} distractors): {probe}."
        )
    lines += encoder_lines(out, "instance_encoder", INSTANCE_ENCODERS)
    refs = ", ".join(
        f"{k} {v['test']['identity']:.3f}" for k, v in cal.get("rows", {}).items() if "test" in v
    )
    lines += [
        f"- `instance_calibration.json`: the pixel identity threshold {cal.get('threshold', float('nan')):.3f}"
        f" and the reference rows (identity on the test concepts): {refs}.",
        "- `instance_concepts/` (24 test concepts), `instance_validation_concepts/` (8) and"
        " `instance_validation_concepts_24/` (those 8 and 16 more, `instance-concepts --times 3`): input images;"
        " `instance_vocabulary.txt`: the category words (the regulariser's vocabulary); `instance_results/`:"
        " the grids and trade-off plots of docs/research/instance_world.md.",
    ]
    return lines
