"""Copies the toy-world evaluation's plots into assets/toyworld/results/ and draws one concept across methods.

    python scripts/toyworld_figures.py outputs/eval_toyworld [--concept red_striped_star]

Writes ``tradeoff.png``, ``tradeoff_clip.png``, ``nearest_words.md``, ``summary_table.md`` and
``concept_<name>.png`` (rows: methods at their main setting; columns: the concept's prompts, sample 0; the first
column is the input image) with ``concept_<name>.txt`` naming rows and columns.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.toyworld import save_grid  # noqa: E402
from evaluation.results import read_results  # noqa: E402

MAIN = {  # method -> (steps, alpha) drawn in the concept figure
    "plain_words": (0, 1.0),
    "encoder_only": (0, 0.5),
    "date": (12, 0.5),
    "date_factors": (12, 1.0),
    "no_regularizer": (12, 0.5),
    "textual_inversion": (500, 1.0),
    "lora": (500, 1.0),
    "date_export": (12, 1.0),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", help="the evaluation's out_dir")
    parser.add_argument("--concept", default="red_striped_star")
    parser.add_argument("--out", default="assets/toyworld/results")
    args = parser.parse_args(argv)
    run, out = Path(args.run), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tradeoff.png", "tradeoff_clip.png", "nearest_words.md"):
        shutil.copy(run / name, out / name)
    rows = [r for r in read_results(run / "results.csv") if r["concept"] == args.concept and r["sample"] == 0]
    concept_png = Path("assets/toyworld/concepts") / f"{args.concept}.png"
    input_img = np.asarray(Image.open(concept_png).convert("RGB"))
    images, names, prompts = [], [], {}
    for method, (steps, alpha) in MAIN.items():
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
    save_grid(np.stack(images), str(out / f"concept_{args.concept}.png"), cols=cols, scale=3)
    text = [
        "rows: " + "; ".join(f"{i + 1}. {n}" for i, n in enumerate(names)),
        "columns: 0. the input image; " + "; ".join(f"{i + 1}. {p}" for i, p in sorted(prompts.items())),
    ]
    (out / f"concept_{args.concept}.txt").write_text("\n".join(text) + "\n")
    print(out)


if __name__ == "__main__":
    main()
