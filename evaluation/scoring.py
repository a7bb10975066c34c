"""The metric backbones of a run and per-image scoring of generated images (CLIP-I, CLIP-T, optional DINO)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from evaluation.checker_metrics import CheckerMetric
from evaluation.feature_models import ClipFeatures, DinoFeatures
from evaluation.metrics import IdentitySimilarity, PromptSimilarity, identity_scores, prompt_scores
from evaluation.spec import MetricSpec
from evaluation.tiny_models import write_tiny_eval_models


class MetricSuite:
    """Loads the CLIP (and DINO) backbones once and scores batches of generated images.

    Args:
        spec: which backbones (or the tiny offline ones, built when missing).
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
        self.checker = CheckerMetric(spec.checker, device) if spec.checker else None
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
        if self.checker is not None:
            records["checker"] = self.checker.describe()
        return {name: _jsonable(r) for name, r in records.items()}

    def score(
        self,
        generated: Tensor,
        references: Tensor,
        prompts: list[str],
        class_noun: str,
        placeholder: str,
        input_index: int | None = None,
        wanted: list[dict[str, str]] | None = None,
    ) -> dict[str, list[float] | None]:
        """Per-image scores of one concept's images.

        Args:
            generated: (N, 3, H, W) generated images in [0, 1] (as saved: uint8-quantised).
            references: (M, 3, H', W') the concept's real images in [0, 1].
            prompts: the N prompts, with the placeholder.
            class_noun: replaces the placeholder for CLIP-T (the concept's plain words where it has them).
            placeholder: the placeholder in ``prompts``.
            input_index: which reference is the input image the concept was learned from (None: none is).
            wanted: the N scenes asked for, read against the checker's readings (None: no checker scores).

        Returns:
            ``{"clip_i", "clip_t", "dino", "clip_i_no_input", "dino_no_input"}``, each [N] or None: identity
            against all references and against the references without the input image (None when there is no
            input among them or it is the only one); with a checker and ``wanted``, also every column of
            ``checker_metrics.CHECKER_COLUMNS``.
        """
        exclude = input_index if input_index is not None and references.shape[0] > 1 else None
        out: dict[str, list[float] | None] = {
            "clip_i": identity_scores(self.clip, generated, references).tolist(),
            "clip_t": prompt_scores(self.clip, generated, prompts, class_noun, placeholder).tolist(),
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
        if self.checker is not None and wanted is not None:
            out.update(self.checker.score(generated, wanted))
        return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
