"""Evaluation of personalization methods: tune, generate, score, aggregate, plot (docs/method.md, "Sampling and
evaluation").

    python evaluate.py run --config configs/evaluate/tiny.yaml         # tiny offline run (well under a minute)
    python evaluate.py run --config configs/evaluate/sd15_dreambench.yaml --concepts.dreambench_root PATH
    python evaluate.py plot --results outputs/eval_tiny/results.csv     # redraw tradeoff.png from rows
    python evaluate.py sample --concept outputs/concepts/x.safetensors --prompts '["a <s*> on the left"]'
    python evaluate.py run --help                                       # every option, documented
    python evaluate.py ... --verbose                # the libraries' own notices and bars too (quiet by default)

``run`` writes ``results.csv`` (one row per image), ``summary.json`` (aggregates with bootstrap 95 % intervals,
metric descriptions, configuration, wall times), ``grids/`` and ``tradeoff.png`` into ``--out_dir``; rerunning
it skips the rows already written.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from models.quiet import pop_verbose, quiet_libraries  # noqa: E402

if __name__ == "__main__" and not pop_verbose(sys.argv):
    quiet_libraries()  # before the imports below: transformers' notices are emitted while importing

from jsonargparse import CLI  # noqa: E402

from evaluation.config import EvaluationConfigError, check_stacked_methods, replaced_tune_overrides  # noqa: E402
from evaluation.harness import run_evaluation  # noqa: E402
from evaluation.report.aggregate import aggregate, format_table  # noqa: E402
from evaluation.report.budget import plot_identity_vs_seconds  # noqa: E402
from evaluation.report.plot import plot_tradeoff  # noqa: E402
from evaluation.sample_concept import sample_concept  # noqa: E402
from evaluation.store.results import read_results  # noqa: E402
from evaluation.store.run_state import register_plugin_columns  # noqa: E402
from lightning_modules.cli_errors import ShortErrorParser  # noqa: E402
from models.errors import TuningEncoderError  # noqa: E402
from models.sampling import SAMPLERS  # noqa: E402


def plot(
    results: str | list[str] = "outputs/eval_tiny/results.csv",
    out: str | None = None,
    x: str = "clip_t",
    y: str = "clip_i",
    reference_points: bool = False,
    bootstrap_samples: int = 1000,
    title: str | None = None,
    ceiling: float | None = None,
    methods: dict[str, str] | None = None,
) -> Path:
    """Redraws the trade-off plot from existing results.csv files (no model is loaded).

    Args:
        results: one or more results.csv files; with several, methods are prefixed by their folder name.
        out: output PNG (default: tradeoff.png next to the first results file).
        x: metric column on the x axis (clip_t); ``tune_seconds`` draws identity against tuning time instead:
            every method through its step budgets, seconds on a log axis, the plain words as a line.
        y: metric column on the y axis (clip_i or dino).
        reference_points: draw the published DreamBench numbers (SD 1.x scale only).
        bootstrap_samples: bootstrap resamples of the 95 % intervals (over concepts).
        title: figure title.
        ceiling: with ``--x tune_seconds``, the best identity the generator can show, drawn as a line.
        methods: draw only these methods, each under a label: a JSON object ``{"<method>": "<label>"}`` (with
            several results files a method's name carries its folder, e.g. ``"eval_x/date"``); methods sharing a
            label become one line through their step budgets (e.g. a baseline at the rate validation chose for
            each budget). A key may end in ``@`` and ``guidance=G``, ``alpha=A``, ``steps=S`` (comma-separated,
            e.g. ``"eval_x/date@guidance=2,alpha=0.5"``) to take only those rows, so each budget of a method can be
            drawn at the setting its validation chose (one line per label). None: every method under its own name.

    Returns:
        The PNG path.
    """
    paths = [results] if isinstance(results, str) else list(results)
    if not paths:
        raise EvaluationConfigError("plot needs at least one results.csv (--results)")
    rows: list[dict[str, Any]] = []
    for path in paths:
        register_plugin_columns(Path(path).parent)  # e.g. the checker's column labels
        file_rows = read_results(path)
        if len(paths) > 1:
            for row in file_rows:
                row["method"] = f"{Path(path).parent.name}/{row['method']}"
        rows.extend(file_rows)
    if not rows:
        raise EvaluationConfigError(f"no rows in {', '.join(paths)}")
    if methods is not None:
        rows = select_rows(rows, methods)
    aggregates = aggregate(rows, n_boot=bootstrap_samples)
    if x == "tune_seconds":
        default = Path(paths[0]).with_name("identity_vs_seconds.png")
        target = plot_identity_vs_seconds(
            aggregates, out or default, y=y, ceiling=ceiling, title=title, line_per_method=methods is not None
        )
    else:
        target = plot_tradeoff(
            aggregates,
            out or Path(paths[0]).with_name("tradeoff.png"),
            x=x,
            y=y,
            reference_points=reference_points,
            title=title,
        )
    print(format_table(aggregates))
    print(f"wrote {target}")
    return target


def select_rows(rows: list[dict[str, Any]], methods: dict[str, str]) -> list[dict[str, Any]]:
    """The rows ``plot --methods`` names, each under its label; a key ``<method>@guidance=G,alpha=A,steps=S`` takes
    only that method's rows at those settings (any may be left out; one method may have several keys).

    Raises:
        EvaluationConfigError: a key names a method, setting or value that no row has.
    """

    def matches(row: dict[str, Any], where: dict[str, float]) -> bool:
        return all(abs(row[k] - v) < 1e-9 for k, v in where.items())

    found = sorted({row["method"] for row in rows})
    chosen: dict[str, list[tuple[dict[str, float], str]]] = {}
    for key, label in methods.items():
        name, _, spec = key.partition("@")
        where: dict[str, float] = {}
        for part in filter(None, spec.split(",")):
            field, _, value = (x.strip() for x in part.partition("="))
            try:
                if field not in ("guidance", "alpha", "steps"):
                    raise ValueError(field)
                where[field] = float(value)
            except ValueError:
                raise EvaluationConfigError(
                    f"--methods key {key!r}: after '@' write guidance=, alpha= and / or steps=<number>"
                ) from None
        if name not in found:
            raise EvaluationConfigError(f"--methods names {[name]}, not in the results ({', '.join(found)})")
        if not any(r["method"] == name and matches(r, where) for r in rows):
            raise EvaluationConfigError(f"--methods key {key!r}: {name} has no rows at {spec}")
        chosen.setdefault(name, []).append((where, label))
    out = []
    for row in rows:
        label = next((lab for where, lab in chosen.get(row["method"], []) if matches(row, where)), None)
        if label is not None:
            out.append({**row, "method": label})
    return out


@functools.wraps(sample_concept)
def sample(prompts: list[str] | str | None = None, **kwargs) -> Path:
    """:func:`~evaluation.sample_concept.sample_concept` with its values checked before any model is loaded."""
    if isinstance(prompts, str):  # what jsonargparse leaves when the value is not a JSON list of strings
        raise EvaluationConfigError(
            f"--prompts {prompts!r} is not a JSON list of strings, e.g. '[\"a <s*>\"]'"
        )
    alpha = kwargs.get("alpha")
    if alpha is not None and not 0.0 <= alpha <= 1.0:
        raise EvaluationConfigError(f"--alpha must lie in [0, 1], got {alpha}")
    sampler = kwargs.get("sampler", "ddim")
    if sampler not in SAMPLERS:
        raise EvaluationConfigError(
            f"--sampler {sampler!r} is unknown; choose one of {', '.join(sorted(SAMPLERS))}"
        )
    for name in ("samples_per_prompt", "num_inference_steps", "scale"):
        if name in kwargs and kwargs[name] < 1:
            raise EvaluationConfigError(f"--{name} must be >= 1, got {kwargs[name]}")
    path = sample_concept(prompts=prompts, **kwargs)
    print(f"wrote {path} (one row per prompt, listed in {path.with_suffix('.txt')})")
    return path


# The command's options are sample_concept's, with --prompts also accepting a malformed value (to name it).
sample.__annotations__ = {**sample_concept.__annotations__, "prompts": "list[str] | str | None"}


def main(args: list[str] | None = None) -> Any:
    """Command-line entry point; a mistake in the input exits with one line (status 2)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # per-file loading bars would break the evaluation's own bar
    try:
        argv = sys.argv[1:] if args is None else list(args)
        check_stacked_methods(argv)
        for note in replaced_tune_overrides(argv):
            print(f"evaluate.py: note: {note}", file=sys.stderr)
        return CLI(
            {"run": run_evaluation, "plot": plot, "sample": sample},
            args=args,
            parser_mode="omegaconf",
            parser_class=ShortErrorParser,
        )
    except (EvaluationConfigError, TuningEncoderError) as err:
        message = " ".join(str(err).split())
        print(f"evaluate.py: error: {message}", file=sys.stderr)
        raise SystemExit(2) from err


if __name__ == "__main__":
    main()
