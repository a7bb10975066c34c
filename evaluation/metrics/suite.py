"""The metric backbones of a run and per-image scoring of one concept's generated images: CLIP-I, CLIP-T,
optional DINO, and the metric plug-ins (``metrics.plugins``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import Tensor

from evaluation.concepts.base import EvalConcept
from evaluation.config import EvaluationConfigError
from evaluation.metrics.features import ClipFeatures, DinoFeatures
from evaluation.metrics.registry import ImageMetric
from evaluation.metrics.similarity import (
    SIMILARITY_COLUMNS,
    IdentitySimilarity,
    PromptSimilarity,
    identity_scores,
    prompt_scores,
)
from evaluation.metrics.tiny_models import write_tiny_eval_models


@dataclass
class MetricSpec:
    """Backbones of the identity (CLIP-I, DINO) and prompt (CLIP-T) similarities, and metric plug-ins.

    Args:
        clip: CLIP model folder or cached hub id for CLIP-I and CLIP-T.
        dino: DINO ViT folder or cached hub id for the DINO score (None: skip DINO).
        tiny_models_dir: if set, use (and build when missing) the tiny offline CLIP and DINO models in this
            folder instead of ``clip`` / ``dino``; their numbers only test the plumbing.
        batch_size: images per metric forward pass.
        clip_tokenizer: folder of the CLIP tokenizer when ``clip`` has none (the toy world's pipeline/tokenizer).
        clip_processor: folder of the ``preprocessor_config.json`` when ``clip`` has none.
        vocabulary: words file (one a line, ``#`` comments) the nearest word of each v* is searched among
            (None: the artefact's own nearest token).
        plugins: further metrics by ``class_path`` (``evaluation.metrics.registry.ImageMetric`` subclasses),
            e.g. the toy world's attribute checker ``toyworld.CheckerMetric``.
    """

    clip: str = "openai/clip-vit-base-patch32"
    dino: str | None = "facebook/dino-vits16"
    tiny_models_dir: str | None = None
    batch_size: int = 32
    clip_tokenizer: str | None = None
    clip_processor: str | None = None
    vocabulary: str | None = None
    plugins: list[ImageMetric] = field(default_factory=list)

    def check(self, concepts: Sequence[EvalConcept]) -> None:
        """The CLIP helper folders and vocabulary exist and every plug-in can score these concepts.

        Raises:
            EvaluationConfigError: what is missing.
        """
        for what, path in (
            ("metrics.clip_tokenizer", self.clip_tokenizer),
            ("metrics.clip_processor", self.clip_processor),
        ):
            if path is not None and not Path(path).is_dir():
                raise EvaluationConfigError(f"{what} {path} is not a folder")
        if self.vocabulary is not None and not Path(self.vocabulary).is_file():
            raise EvaluationConfigError(f"metrics.vocabulary {self.vocabulary} does not exist")
        for plugin in self.plugins:
            plugin.check(concepts)

    def columns(self) -> list[str]:
        """Every metric column of a run with this spec, in ``results.csv`` order."""
        return [c.name for c in SIMILARITY_COLUMNS] + [c.name for p in self.plugins for c in p.columns]

    def record(self) -> dict[str, Any]:
        """The spec as JSON-compatible data, each plug-in as its class path and options (``run.json``)."""
        fields = {k: getattr(self, k) for k in self.__dataclass_fields__ if k != "plugins"}
        plugins = [
            {"class_path": f"{type(p).__module__}.{type(p).__qualname__}", "init_args": p.settings()}
            for p in self.plugins
        ]
        return {**fields, "plugins": plugins}


class MetricSuite:
    """Loads the CLIP (and DINO) backbones and the plug-ins once and scores groups of generated images.

    Args:
        spec: which backbones (or the tiny offline ones, built when missing) and plug-ins.
        device: device of the backbones.

    Raises:
        OSError: a backbone is neither a local folder nor cached (``HF_HUB_OFFLINE=1``).
    """

    def __init__(self, spec: MetricSpec, device: str = "cpu") -> None:
        clip_path, dino_path = spec.clip, spec.dino
        if spec.tiny_models_dir is not None:
            tiny = write_tiny_eval_models(spec.tiny_models_dir)
            clip_path, dino_path = str(tiny["clip"]), str(tiny["dino"])
        self.clip = ClipFeatures(clip_path, spec.batch_size, spec.clip_tokenizer, spec.clip_processor).to(
            device
        )
        self.plugins = [p.load(device) for p in spec.plugins]
        self.dino = DinoFeatures(dino_path, batch_size=spec.batch_size).to(device) if dino_path else None
        self.clip_backbone = str(clip_path)
        self.dino_backbone = str(dino_path) if dino_path else None

    def describe(self) -> dict[str, Any]:
        """``{"CLIP-I": ..., "CLIP-T": ..., "DINO": ...}``: backbone, preprocessing and pairing of each metric."""
        records = {
            "CLIP-I": IdentitySimilarity(self.clip).describe(),
            "CLIP-T": PromptSimilarity(self.clip).describe(),
        }
        if self.dino is not None:
            records["DINO"] = IdentitySimilarity(self.dino).describe()
        for plugin in self.plugins:
            records[plugin.name] = plugin.describe()
        return {name: _jsonable(r) for name, r in records.items()}

    def score(
        self,
        generated: Tensor,
        references: Tensor,
        concept: EvalConcept,
        prompt_indices: Sequence[int],
        placeholder: str,
    ) -> dict[str, list[float] | None]:
        """Per-image scores of one concept's images.

        Args:
            generated: (N, 3, H, W) generated images in [0, 1] (as saved: uint8-quantised).
            references: (M, 3, H', W') the concept's real images in [0, 1].
            concept: the concept (its prompts, words for CLIP-T, input reference index, checked attributes).
            prompt_indices: the prompt each image was made for.
            placeholder: the placeholder in the prompts.

        Returns:
            ``{"clip_i", "clip_t", "dino", "clip_i_no_input", "dino_no_input"}``, each [N] or None: identity
            against all references and against the references without the input image (None when there is no
            input among them or it is the only one); and every plug-in's columns.
        """
        prompts = [concept.prompts[i] for i in prompt_indices]
        index = concept.input_reference_index
        exclude = index if index is not None and references.shape[0] > 1 else None
        out: dict[str, list[float] | None] = {
            "clip_i": identity_scores(self.clip, generated, references).tolist(),
            "clip_t": prompt_scores(self.clip, generated, prompts, concept.words, placeholder).tolist(),
            "dino": None,
            "clip_i_no_input": None,
            "dino_no_input": None,
        }
        if exclude is not None:
            out["clip_i_no_input"] = identity_scores(self.clip, generated, references, exclude).tolist()
        if self.dino is not None:
            out["dino"] = identity_scores(self.dino, generated, references).tolist()
            if exclude is not None:
                out["dino_no_input"] = identity_scores(self.dino, generated, references, exclude).tolist()
        for plugin in self.plugins:
            out.update(plugin.score(generated, concept, prompt_indices))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
