"""Stage 3 of an evaluation, the plan, made without loading any model: methods resolved from their YAMLs
(``recipe.py``), the concept set loaded, and each method's settings. Every configuration error surfaces here,
as one line, before any work.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from evaluation.concepts.base import ConceptSet, EvalConcept, load_concepts
from evaluation.config import EvaluationConfigError, MethodSpec, SweepSpec
from evaluation.recipe import TuneRecipe, resolve_recipe
from models.artifact import ConceptArtifact


@dataclass(frozen=True, order=True)
class Setting:
    """One point of a trade-off curve.

    Attributes:
        steps: tuning steps of the concept.
        alpha: dual-path blend at sampling.
        guidance: classifier-free guidance scale.
    """

    steps: int
    alpha: float
    guidance: float

    @property
    def label(self) -> str:
        """Folder-safe name, e.g. ``s4_a0.5_g7.5``."""
        return f"s{self.steps}_a{self.alpha:g}_g{self.guidance:g}"


def file_identity(path: str | Path | None) -> dict[str, Any] | None:
    """``{"path", "size", "mtime_ns"}`` of a file (None for no file): changes when the file is rewritten.

    An encoder folder is identified by its weights file; a hub id by its name alone."""
    if path is None:
        return None
    target = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    if not target.is_file():
        return {"path": str(path)}
    stat = target.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass
class MethodPlan:
    """A method with its settings: ``recipe`` for a tuned method, ``artifacts`` (by concept) for a loaded one."""

    spec: MethodSpec
    settings: list[Setting]
    recipe: TuneRecipe | None = None
    artifacts: dict[str, ConceptArtifact] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    """Settings dropped because another method's identical point is evaluated: ``label -> "method/label"``."""

    @property
    def kind(self) -> str:
        """``tuned``, ``artifacts``, ``plain_words`` (no concept) or ``export`` (another method's concepts,
        exported and sampled in plain diffusers)."""
        if self.recipe is not None:
            return "tuned"
        if self.spec.plain_words:
            return "plain_words"
        return "export" if self.spec.export_of else "artifacts"

    @property
    def steps(self) -> list[int]:
        """Every step count this method is evaluated at."""
        return sorted({s.steps for s in self.settings})


def _settings(steps: list[int], alphas: list[float], guidances: list[float], where: str) -> list[Setting]:
    if not steps or not alphas or not guidances:
        raise EvaluationConfigError(f"{where}: steps, alphas and guidance_scales must be non-empty")
    if (
        any(s < 0 for s in steps)
        or any(not 0.0 <= a <= 1.0 for a in alphas)
        or any(g <= 0 for g in guidances)
    ):
        raise EvaluationConfigError(f"{where}: need steps >= 0, 0 <= alpha <= 1 and guidance > 0")
    return sorted({Setting(int(s), float(a), float(g)) for s in steps for a in alphas for g in guidances})


def _plan_method(
    spec: MethodSpec,
    sweep: SweepSpec,
    recipe: TuneRecipe | None,
    concepts: list[EvalConcept],
    placeholder: str,
    earlier: list[MethodPlan] | None = None,
) -> MethodPlan:
    earlier = earlier or []
    alphas = spec.alphas or sweep.alphas
    guidances = spec.guidance_scales or sweep.guidance_scales
    where = f"method {spec.name!r}"
    grids = [
        (
            g.steps,
            spec.alphas or g.alphas or sweep.alphas,
            spec.guidance_scales or g.guidance_scales or guidances,
        )
        for g in sweep.grids
    ]
    if spec.plain_words:
        # No concept: one point per guidance scale (steps 0; alpha 1 = the plain model, with nothing to blend).
        return MethodPlan(spec, _settings([0], [1.0], guidances, where))
    if spec.export_of:
        source = next(p for p in earlier if p.spec.name == spec.export_of)
        steps = list(spec.steps) if spec.steps is not None else [max(source.steps)]
        missing = sorted(set(steps) - set(source.steps))
        if missing:
            raise EvaluationConfigError(
                f"{where}: steps {missing} are not evaluated by {spec.export_of!r} (its steps: {source.steps})"
            )
        # An export is single path: alpha 1 whatever the source was sampled with.
        return MethodPlan(spec, _settings(steps, [1.0], guidances, where))
    if recipe is None:
        assert spec.artifacts is not None
        paths = {c.name: Path(spec.artifacts) / f"{c.name}.safetensors" for c in concepts}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise EvaluationConfigError(f"{where}: concept artefacts missing: {', '.join(missing)}")
        arts = {name: ConceptArtifact.load(p) for name, p in paths.items()}
        if any(a.placeholder != placeholder for a in arts.values()):
            raise EvaluationConfigError(f"{where}: artefacts use another placeholder than {placeholder!r}")
        steps = sorted({a.steps for a in arts.values()})
        return MethodPlan(spec, _settings(steps, alphas, guidances, where), artifacts=arts)

    def method_steps(grid_steps: list[int] | None) -> list[int]:
        steps = list(spec.steps) if spec.steps is not None else list(grid_steps or sweep.steps)
        if spec.steps is None and recipe.max_steps_cap is not None:
            steps = [s for s in steps if s <= recipe.max_steps_cap] or [recipe.max_steps_cap]
        return steps

    settings = set(_settings(method_steps(None), alphas, guidances, where))
    for g_steps, g_alphas, g_guidances in grids:
        settings.update(_settings(method_steps(g_steps), g_alphas, g_guidances, f"{where} (sweep.grids)"))
    return MethodPlan(spec, sorted(settings), recipe=recipe)


# The arguments that decide a tuned method's step-0 concept (its initial prediction) and how it is sampled; two
# methods equal in all of them produce the same step-0 images (e.g. encoder_only and date).
_STEP0_KEYS = (
    "pretrained_model_name_or_path",
    "image_encoder_name_or_path",
    "encoder_checkpoint",
    "placeholder",
    "personalizer",
    "init",
    "init_token",
    "init_noise_draws",
    "instance_prompt",
    "seed",
)


def _step0_key(recipe: TuneRecipe) -> str:
    kw = recipe.model_kwargs
    return repr(
        [(k, kw.get(k)) for k in _STEP0_KEYS] + [("tune_encoder", "encoder" in (kw.get("tune") or []))]
    )


def dedupe_step0(plans: list[MethodPlan]) -> None:
    """Drops the step-0 settings a method shares with an earlier method of the same initial prediction.

    The dropped points are recorded in ``aliases`` (reported in summary.json), so no image is generated twice
    and no curve carries a copy of another method's point.
    """
    owners: dict[tuple[str, Any], str] = {}
    for plan in plans:
        if plan.recipe is None:
            continue
        key = _step0_key(plan.recipe)
        kept = []
        for setting in plan.settings:
            owner = owners.get((key, setting)) if setting.steps == 0 else None
            if owner is None:
                kept.append(setting)
                if setting.steps == 0:
                    owners[(key, setting)] = plan.spec.name
            else:
                plan.aliases[setting.label] = f"{owner}/{setting.label}"
        plan.settings = kept


def _check_methods(methods: list[MethodSpec]) -> None:
    if not methods:
        raise EvaluationConfigError("no methods to evaluate (methods is empty)")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise EvaluationConfigError(f"duplicate method names {names}")
    bad = [n for n in names if not n or "/" in n or "\\" in n or n.startswith(".")]
    if bad:
        raise EvaluationConfigError(f"method names must be folder-safe, got {bad}")
    both = [m.name for m in methods if m.artifacts and (m.overlay or m.overrides)]
    if both:
        raise EvaluationConfigError(
            f"methods {both} set artifacts and a tuning overlay / overrides: pick one"
        )
    untuned = [
        m.name
        for m in methods
        if (m.plain_words or m.export_of) and (m.artifacts or m.overlay or m.overrides or m.alphas)
    ]
    if untuned or any(m.plain_words and m.export_of for m in methods):
        raise EvaluationConfigError(
            f"methods {untuned or [m.name for m in methods if m.plain_words]}: plain_words / export_of take no "
            "artifacts, overlay, overrides or alphas (and not both)"
        )
    for i, m in enumerate(methods):
        tuned_before = [e.name for e in methods[:i] if not (e.artifacts or e.plain_words or e.export_of)]
        if m.export_of and m.export_of not in tuned_before:
            raise EvaluationConfigError(
                f"method {m.name!r}: export_of {m.export_of!r} must name an earlier tuned method {tuned_before}"
            )


def make_plans(
    out: Path,
    tune_config: str,
    methods: list[MethodSpec],
    concepts: ConceptSet,
    sweep: SweepSpec,
    overrides: dict[str, Any],
) -> tuple[TuneRecipe, list[EvalConcept], list[MethodPlan]]:
    """Resolves the base recipe, the concepts and every method's plan.

    Args:
        out: output folder (tuned methods export their final artefacts under ``out/artifacts/<method>``).
        tune_config: base tune YAML.
        methods: the methods.
        concepts: the concept set.
        sweep: the default settings.
        overrides: run-wide tune overrides (dotted keys).

    Returns:
        (base recipe: backbone and placeholder, concepts, method plans).

    Raises:
        EvaluationConfigError: any configuration that cannot run.
    """
    _check_methods(methods)
    base = resolve_recipe(tune_config, MethodSpec(name="base"), overrides, str(out), check_checkpoint=False)
    concept_list = load_concepts(concepts, base.placeholder)
    plans = []
    for spec in methods:
        recipe = None
        if spec.artifacts is None and not spec.plain_words and not spec.export_of:
            recipe = resolve_recipe(tune_config, spec, overrides, str(out / "artifacts" / spec.name))
            if recipe.placeholder != base.placeholder:
                raise EvaluationConfigError(f"method {spec.name!r} changes the placeholder the prompts use")
        if spec.plain_words and any(c.plain_words is None for c in concept_list):
            raise EvaluationConfigError(
                f"method {spec.name!r}: plain_words needs concepts with plain words (e.g. the toy world's)"
            )
        plans.append(_plan_method(spec, sweep, recipe, concept_list, base.placeholder, plans))
    dedupe_step0(plans)
    return base, concept_list, plans


def plan_recipes(plans: list[MethodPlan]) -> dict[str, dict[str, Any]]:
    """The resolved tune config of each tuned method, by name."""
    return {p.spec.name: p.recipe.config for p in plans if p.recipe}


def plan_inputs(plans: list[MethodPlan]) -> dict[str, Any]:
    """Identities (size, mtime) of the files each method's rows depend on: checkpoint or artefacts."""
    inputs: dict[str, Any] = {}
    for p in plans:
        if p.recipe is not None:
            inputs[p.spec.name] = file_identity(p.recipe.encoder_checkpoint)
        elif p.kind in ("plain_words", "export"):
            inputs[p.spec.name] = p.spec.export_of  # the base model, or the source method's concepts
        else:
            folder = Path(p.spec.artifacts or "")
            inputs[p.spec.name] = {c: file_identity(folder / f"{c}.safetensors") for c in p.artifacts}
    return inputs
