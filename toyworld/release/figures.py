"""Copies the toy-world evaluation's plots into assets/toyworld/results/ and draws one concept across methods.

    python -m toyworld figures outputs/eval_toyworld [--concept red_striped_star]

Writes ``tradeoff.png``, ``tradeoff_clip.png``, ``nearest_words.md``, ``summary_table.md`` and
``concept_<name>.png`` (rows: methods at their main setting; columns: the concept's prompts, sample 0; the first
column is the input image) with ``concept_<name>.txt`` naming rows and columns.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from evaluation.generate.images import save_grid
from evaluation.store.results import read_results

MAIN = {  # method -> (steps, alpha) drawn in the concept figure
    "plain_words": (0, 1.0),
    "encoder_only": (0, 0.5),
    "date": (12, 0.5),
    "date_lr3e-2": (12, 0.5),  # the instance world's rank-16 encoder, tuned as chosen on validation
    "date_lr1e-2": (4, 0.5),
    "date_factors": (12, 1.0),
    "date_cores": (12, 0.5),  # the named world's DATE with the factors frozen
    "no_regularizer": (12, 0.5),
    "textual_inversion": (500, 1.0),
    "lora": (500, 1.0),
    "date_export": (12, 1.0),
}


def write_figures(
    run: Path,
    concept: str = "red_striped_star",
    out: Path = Path("assets/toyworld/results"),
    concepts_dir: Path = Path("assets/toyworld/concepts"),
    main: dict[str, tuple[int, float]] | None = None,
) -> Path:
    """Copies ``run``'s plots (as 256-colour PNGs, a third of the bytes, to keep the assets small) and word table
    into ``out`` and draws ``concept`` (its input image from ``concepts_dir``) across methods (module docstring):
    each method of ``main`` (default :data:`MAIN`, method -> (steps, alpha)) that the run holds, one row.

    Returns:
        ``out``.
    """
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tradeoff.png", "tradeoff_clip.png"):
        with Image.open(run / name) as plot:  # a chart has few colours: the palette keeps it intact
            palette = plot.convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
            palette.save(out / name, optimize=True)
    shutil.copy(run / "nearest_words.md", out / "nearest_words.md")
    rows = [r for r in read_results(run / "results.csv") if r["concept"] == concept and r["sample"] == 0]
    concept_png = Path(concepts_dir) / f"{concept}.png"
    input_img = np.asarray(Image.open(concept_png).convert("RGB"))
    images, names, prompts = [], [], {}
    for method, (steps, alpha) in (MAIN if main is None else main).items():
        picked = sorted(
            (
                r
                for r in rows
                if r["method"] == method and r["steps"] == steps and abs(r["alpha"] - alpha) < 1e-6
            ),
            key=lambda r: r["prompt_idx"],
        )
        if not picked:
            continue
        names.append(f"{method} (steps {steps}, alpha {alpha:g})")
        images.append(input_img)
        for r in picked:
            images.append(np.asarray(Image.open(run / r["image"]).convert("RGB")))
            prompts[r["prompt_idx"]] = r["prompt"]
    cols = 1 + len(prompts)
    save_grid(np.stack(images), str(out / f"concept_{concept}.png"), cols=cols, scale=3)
    text = [
        "rows: " + "; ".join(f"{i + 1}. {n}" for i, n in enumerate(names)),
        "columns: 0. the input image; " + "; ".join(f"{i + 1}. {p}" for i, p in sorted(prompts.items())),
    ]
    (out / f"concept_{concept}.txt").write_text("\n".join(text) + "\n")
    return out
