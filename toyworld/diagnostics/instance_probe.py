"""The image-branch gate on the instance world: do the features DATE's image branch reads see the
instance, not only the category?

Probes are fitted on ``n_train`` training-distribution instances (``sample_instance(rng, "train")``), one
random context each, and tested on held-out instances, each rendered in two different contexts (both renders
are probed): ``cells``, instances in the **test** cells of the training categories (``cell_split()["test"]``;
with ``--cells validation``, the validation cells instead, to choose among encoder variants), and
``categories``, instances of the held-out categories (heart, moon, arrow; whole detail space). Every render
has the world's place / size jitter.

Each detail gets a linear read-out of the features: continuous ones by ridge regression (standardised features,
penalty chosen on the last 20 % of the training set, then refitted on all of it) scored by R² on held-out
instances (1 - SSE / SST, pooled over the target's columns); categorical ones by multinomial logistic regression
(``image_encoder.linear_probe``) scored by accuracy. Targets:

- ``hue``: (cos, sin) of the hue. ``saturation``, ``value``, ``aspect``, ``roundness``: the number (roundness is
  each family's own free parameter, read by one probe over all families).
- ``rotation``: the families that turn all the way round, modulo their symmetry, as (cos, sin) of
  ``360 * rotation / period``: star period 360 / points (its point layout; the squeeze along its axis, aspect
  >= 0.75, breaks this only slightly), moon and arrow 360. A circle's rotation is visible only through its
  elongation, so its target is the elongation vector ``(1 - aspect) / 0.35 * (cos 2r, sin 2r)`` (length 1 at the
  most elongated circle, 0 for a round one).
- ``tilt``: the families that only lean (square, diamond +-15 deg, triangle, cross +-20, heart +-25): degrees.
- ``angle`` (pattern angle, patterned instances only), modulo the pattern's symmetry: stripes 180 deg, checks
  and dots 90 deg, as (cos, sin). ``period``: patterned instances only.
- ``pattern`` (4 kinds), ``points`` (stars only, 4-7), ``category`` (the 6 training categories; not defined on
  held-out categories).

Retrieval: query = an instance's first render, gallery = the second render of every held-out instance of the set
(``n_test - 1`` distractors); top-1 by cosine similarity of the features as they are (``1nn``, as
``image_encoder.probe`` does) and of the features standardised with the training set's mean and std (``1nn_z``).
Dimensions constant on the training renders are dropped before every read-out.

Feature options: an image-encoder folder read as DATE reads it (a CLIP: the [CLS] of every 2nd layer, as the
first encoders did; any other tower: the mean-pooled stages, all of them, as ``configs/pretrain/toyworld.yaml``
reads the committed ResNet), and ``pixels`` (the 32 x 32 x 3 render flattened), the floor.

    python -m toyworld instance-probe --out instance_probe.json
    python -m toyworld instance-probe --encoder assets/toyworld/instance_image_encoder --cells validation
"""

from __future__ import annotations

import numpy as np
import torch

from toyworld.diagnostics.image_probe import linear_probe, read_features
from toyworld.instance.render import render
from toyworld.instance.world import (
    HELD_OUT_CATEGORIES,
    PATTERN_KINDS,
    TRAIN_CATEGORIES,
    Instance,
    random_context,
    sample_instance,
)
from toyworld.named.world import seeded_rng, to_tensor

CONTINUOUS = ("hue", "saturation", "value", "aspect", "roundness", "rotation", "tilt", "angle", "period")
CATEGORICAL = ("pattern", "points", "category")
COLUMNS = (*CONTINUOUS, *CATEGORICAL, "1nn", "1nn_z")
TURNING = ("circle", "star", "moon", "arrow")  # rotate all the way round; the others only lean (tilt)
ALPHAS = (1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)  # ridge penalties, times the number of training samples


def _circ(degrees: float, period: float) -> list[float]:
    a = 2 * np.pi * degrees / period
    return [float(np.cos(a)), float(np.sin(a))]


def target(inst: Instance, detail: str) -> list[float] | int | None:
    """The probe's target for ``detail`` of ``inst`` (a vector, a class index), or None where it is undefined."""
    if detail == "hue":
        return _circ(inst.hue, 360)
    if detail in ("saturation", "value", "aspect", "roundness"):
        return [float(getattr(inst, detail))]
    if detail == "rotation":
        if inst.category not in TURNING:
            return None
        if inst.category == "circle":
            return [(1 - inst.aspect) / 0.35 * c for c in _circ(inst.rotation, 180)]
        return _circ(inst.rotation, 360 / inst.points if inst.category == "star" else 360)
    if detail == "tilt":
        return None if inst.category in TURNING else [inst.rotation]
    if detail in ("angle", "period"):
        if inst.pattern == "plain":
            return None
        return (
            _circ(inst.angle, 180 if inst.pattern == "stripes" else 90)
            if detail == "angle"
            else [inst.period]
        )
    if detail == "pattern":
        return PATTERN_KINDS.index(inst.pattern)
    if detail == "points":
        return inst.points - 4 if inst.category == "star" else None
    if detail == "category":
        return TRAIN_CATEGORIES.index(inst.category) if inst.category in TRAIN_CATEGORIES else None
    raise ValueError(f"unknown detail {detail!r}; known: {', '.join(COLUMNS)}")


def instance_sets(
    n_train: int, n_test: int, n_categories: int, seed: int = 0, cells: str = "test"
) -> dict[str, dict]:
    """Renders (B, 3, 32, 32) in [-1, 1] and instances: ``train`` (one context each), ``cells`` (instances of the
    ``cells`` split's cells: ``test``, or ``validation`` to choose among variants) and ``categories`` (two
    different contexts each: ``pixels`` then ``pixels_b``)."""
    if cells not in ("test", "validation"):
        raise ValueError(f"cells must be test or validation, got {cells!r}")
    out: dict[str, dict] = {}
    for key, (n, split) in {
        "train": (n_train, "train"),
        "cells": (n_test, cells),
        "categories": (n_categories, "held_out_categories"),
    }.items():
        rng = seeded_rng(seed, 0x69707262, len(out))
        if split == "held_out_categories":
            insts = [
                sample_instance(rng, "any", HELD_OUT_CATEGORIES[i % len(HELD_OUT_CATEGORIES)])
                for i in range(n)
            ]
        else:
            insts = [sample_instance(rng, split) for _ in range(n)]
        views = 1 if key == "train" else 2
        images: list[list[np.ndarray]] = [[] for _ in range(views)]
        for inst in insts:
            ctx = [random_context(rng, inst)]
            while len(ctx) < views:
                c = random_context(rng, inst)
                if c != ctx[0]:
                    ctx.append(c)
            for v, c in enumerate(ctx):
                images[v].append(render(inst, c, 32, rng))
        out[key] = {"instances": insts, "pixels": to_tensor(np.stack(images[0]))}
        if views == 2:
            out[key]["pixels_b"] = to_tensor(np.stack(images[1]))
    return out


def ridge_r2(x_tr: torch.Tensor, y_tr: torch.Tensor, x_te: torch.Tensor, y_te: torch.Tensor) -> float:
    """Ridge regression on standardised features (penalty chosen on the training set's last 20 %): held-out R²."""
    x_tr, x_te, y_tr, y_te = (t.double() for t in (x_tr, x_te, y_tr, y_te))
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd

    def fit(x, y):  # one SVD serves every penalty
        xm, ym = x.mean(0), y.mean(0)
        u, s, vt = torch.linalg.svd(x - xm, full_matrices=False)
        uty = u.T @ (y - ym)
        return lambda alpha, z: (z - xm) @ (vt.T @ ((s / (s**2 + alpha * len(x)))[:, None] * uty)) + ym

    def r2(pred, y):
        return float(1 - ((y - pred) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-12))

    cut = int(0.8 * len(x_tr))
    part = fit(x_tr[:cut], y_tr[:cut])
    best = max(ALPHAS, key=lambda a: r2(part(a, x_tr[cut:]), y_tr[cut:]))
    return r2(fit(x_tr, y_tr)(best, x_te), y_te)


def retrieval(
    z_a: torch.Tensor, z_b: torch.Tensor, mu: float | torch.Tensor = 0.0, sd: float | torch.Tensor = 1.0
):
    """Top-1 accuracy: row i of ``z_a`` must find row i of ``z_b`` among all rows of ``z_b`` (cosine similarity
    of ``(z - mu) / sd``; by default of the features as they are)."""
    a = torch.nn.functional.normalize((z_a - mu) / sd, dim=-1)
    b = torch.nn.functional.normalize((z_b - mu) / sd, dim=-1)
    return float(((a @ b.T).argmax(-1) == torch.arange(len(a))).float().mean())


def _varying(x_tr: torch.Tensor, *others: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Drops the dimensions constant on the training rows (a dead channel there, alive on held-out renders, would
    otherwise be standardised by ~0 and swamp every read-out)."""
    keep = x_tr.std(0) > 1e-6 * x_tr.std(0).max().clamp_min(1e-12)
    return tuple(t[:, keep] for t in (x_tr, *others))


def _labelled(feats: torch.Tensor, insts: list[Instance], detail: str):
    rows = [(i, t) for i, inst in enumerate(insts) if (t := target(inst, detail)) is not None]
    if not rows:
        return None, None
    idx = torch.tensor([i for i, _ in rows])
    if detail in CATEGORICAL:
        return feats[idx], torch.tensor([t for _, t in rows])
    return feats[idx], torch.tensor([t for _, t in rows], dtype=torch.float64)


def probe_features(
    feats: dict[str, torch.Tensor], sets: dict[str, dict]
) -> dict[str, dict[str, float | None]]:
    """Every column for the ``cells`` and ``categories`` sets, from features of each set's renders
    (``feats["train"]``, ``feats["cells"]``, ``feats["cells_b"]``, ...)."""
    out: dict[str, dict[str, float | None]] = {}
    train = sets["train"]["instances"]
    for key in ("cells", "categories"):
        insts = sets[key]["instances"] * 2  # both renders are probed
        x_te_all = torch.cat([feats[key], feats[f"{key}_b"]])
        row: dict[str, float | None] = {}
        for detail in (*CONTINUOUS, *CATEGORICAL):
            x_tr, y_tr = _labelled(feats["train"], train, detail)
            x_te, y_te = _labelled(x_te_all, insts, detail)
            if x_te is None or len(x_te) < 4:
                row[detail] = None
                continue
            x_tr, x_te = _varying(x_tr, x_te)
            if detail in CATEGORICAL:
                row[detail] = round(linear_probe(x_tr.float(), y_tr, x_te.float(), y_te), 3)
            else:
                row[detail] = round(ridge_r2(x_tr, y_tr, x_te, y_te), 3)
        z_tr, z_a, z_b = _varying(feats["train"], feats[key], feats[f"{key}_b"])
        row["1nn"] = round(retrieval(z_a, z_b), 3)
        row["1nn_z"] = round(retrieval(z_a, z_b, z_tr.mean(0), z_tr.std(0)), 3)
        row["n"], row["distractors"] = len(sets[key]["instances"]), len(sets[key]["instances"]) - 1
        out[key] = row
    return out


def feature_reader(option: str):
    """``pixels`` or an image-encoder folder -> (a function renders -> features, a description)."""
    if option == "pixels":
        return (lambda px: px.flatten(1).double()), "raw pixels (32 x 32 x 3)"
    from transformers import AutoModel, CLIPVisionModelWithProjection
    from transformers.utils import logging

    from models.image_encoder import CLIP_MODEL_TYPES, image_encoder_model_type

    is_clip = image_encoder_model_type(option) in CLIP_MODEL_TYPES
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a CLIP folder's text tower is "unexpected" in its vision model, as meant
    try:
        enc = (CLIPVisionModelWithProjection if is_clip else AutoModel).from_pretrained(
            option, dtype=torch.float32
        )
    finally:
        logging.set_verbosity(verbosity)
    enc.eval()
    n_states = enc.config.num_hidden_layers + 1 if hasattr(enc.config, "num_hidden_layers") else None
    if is_clip:
        mode, layers = "cls", list(range(2, n_states, 2))
    else:  # a convolutional tower: every stage; a ViT: every layer
        mode = "mean"
        layers = list(range(1, len(enc.config.hidden_sizes) + 1 if n_states is None else n_states))
    desc = f"{option}: {mode} of layers {', '.join(map(str, layers))}"

    def read(px: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [read_features(enc, px[i : i + 256], mode, layers) for i in range(0, len(px), 256)]
        ).double()

    return read, desc


def instance_probe(
    options: list[str],
    n_train: int = 1000,
    n_test: int = 300,
    n_categories: int = 150,
    seed: int = 0,
    cells: str = "test",
) -> dict:
    """The probe table: one row per feature option, for held-out cells (``cells``: the test cells, or the
    validation cells to choose among variants) and held-out categories."""
    torch.manual_seed(seed)
    sets = instance_sets(n_train, n_test, n_categories, seed, cells)
    rows = []
    for option in options:
        read, desc = feature_reader(option)
        feats = {k: read(s["pixels"]) for k, s in sets.items()}
        feats |= {f"{k}_b": read(s["pixels_b"]) for k, s in sets.items() if "pixels_b" in s}
        rows.append({"option": option, "features": desc, **probe_features(feats, sets)})
    out = {"n_train": n_train, "n_test": n_test, "n_categories": n_categories, "seed": seed, "rows": rows}
    return out if cells == "test" else {**out, "cells": cells}  # the committed JSON (test cells) unchanged


def format_table(result: dict) -> str:
    """Markdown: one table per held-out set, rows = feature options, columns = details, category, 1-NN."""
    out = []
    cells = f"held-out instances ({result.get('cells', 'test')} cells)"
    for key, title in (("cells", cells), ("categories", "held-out categories")):
        n = result["rows"][0][key]["n"] if result["rows"] else 0
        out.append(f"{title}: {n} instances x 2 contexts; 1-NN among {n - 1} distractors")
        out.append("| features | " + " | ".join(COLUMNS) + " |")
        out.append("|---|" + "---:|" * len(COLUMNS))
        for row in result["rows"]:
            cells = ["-" if row[key][c] is None else f"{row[key][c]:.2f}" for c in COLUMNS]
            out.append(f"| {row['features']} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)
