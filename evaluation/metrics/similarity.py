"""DreamBench-style personalization metrics as torchmetrics ``Metric``s: identity (CLIP-I / DINO) and prompt
similarity (CLIP-T).

- Identity similarity: each generated image vs every real image of the same subject (cosine of L2-normalised
  embeddings), averaged over the real images, then over all generated images (DreamBooth's protocol).
- Prompt similarity: each generated image vs its prompt with the placeholder (``<s*>``) replaced by the
  subject's class noun ("a <s*> on the beach" -> "a dog on the beach"), averaged over generated images.

Both take tensors and strings, so they are testable without any generation; states are sums reduced with
``dist_reduce_fx="sum"`` so the metrics are exact under DDP. Record ``metric.describe()`` with every number.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.multimodal import CLIPScore
from transformers import CLIPProcessor

from evaluation.concepts.dreambench import PLACEHOLDER, fill_placeholder
from evaluation.metrics.features import ClipFeatures, DinoFeatures, pooled_output
from evaluation.metrics.registry import Column, register

# The columns of every run ("w/o input": identity against the subject's real images without the one the
# method learned from).
SIMILARITY_COLUMNS: tuple[Column, ...] = register(
    Column("clip_i", "CLIP-I", table=True),
    Column("clip_t", "CLIP-T", table=True),
    Column("dino", "DINO", table=True),
    Column("clip_i_no_input", "CLIP-I w/o input", table=True),
    Column("dino_no_input", "DINO w/o input", table=True),
)

IDENTITY_PAIRING = (
    "each generated image vs every real image of the same subject (cosine of L2-normalised embeddings), "
    "averaged over the real images; the metric is the mean over generated images (DreamBench)"
)
PROMPT_PAIRING = (
    "each generated image vs its own prompt with the placeholder replaced by the subject's class noun "
    "(cosine of L2-normalised CLIP image and text embeddings, not clamped, not x100); mean over generated images"
)


def identity_scores(
    features: ClipFeatures | DinoFeatures, generated: Tensor, references: Tensor, exclude: int | None = None
) -> Tensor:
    """Per-image identity similarity of generated images to the real images of one subject.

    Args:
        features: CLIP (CLIP-I) or DINO (DINO score) feature extractor.
        generated: (N, 3, H, W) generated images of one subject, float in [0, 1].
        references: (M, 3, H', W') real images of the same subject, float in [0, 1].
        exclude: index of a reference to leave out (the method's input image: comparing with it rewards
            copying the one image the concept was learned from).

    Returns:
        (N,) mean cosine of each generated image to the M (or M - 1) reference images.

    Raises:
        ValueError: ``exclude`` would leave no reference.
    """
    if exclude is not None:
        keep = [i for i in range(references.shape[0]) if i != exclude]
        if not keep:
            raise ValueError("excluding the input image leaves no reference image")
        references = references[keep]
    gen = features.image_embeds(
        generated
    ).float()  # (N, P); float: cosines are averaged in fp32 under autocast
    ref = features.image_embeds(references).float()  # (M, P)
    return (gen @ ref.T).mean(dim=1)


def fill_prompts(
    prompts: Sequence[str] | str, class_nouns: Sequence[str] | str, n: int, placeholder: str = PLACEHOLDER
) -> list[str]:
    """Broadcasts prompts / class nouns to ``n`` entries and replaces the placeholder by the class noun.

    Raises:
        ValueError: a prompt lacks the placeholder (named in the message), or lengths do not match ``n``.
    """
    prompt_list = [prompts] * n if isinstance(prompts, str) else list(prompts)
    noun_list = [class_nouns] * n if isinstance(class_nouns, str) else list(class_nouns)
    if len(prompt_list) != n or len(noun_list) != n:
        raise ValueError(f"expected {n} prompts and class nouns, got {len(prompt_list)} and {len(noun_list)}")
    return [fill_placeholder(p, c, placeholder) for p, c in zip(prompt_list, noun_list)]


def prompt_scores(
    features: ClipFeatures,
    generated: Tensor,
    prompts: Sequence[str] | str,
    class_nouns: Sequence[str] | str,
    placeholder: str = PLACEHOLDER,
) -> Tensor:
    """Per-image CLIP-T: cosine between each generated image and its prompt (placeholder -> class noun).

    Args:
        features: CLIP feature extractor.
        generated: (N, 3, H, W) generated images, float in [0, 1].
        prompts: N prompts containing ``placeholder`` (or one prompt for all images).
        class_nouns: N class nouns (or one for all images), e.g. ``"dog"``.
        placeholder: the token standing for the learned concept in ``prompts``.

    Returns:
        (N,) cosine similarities in [-1, 1].
    """
    texts = fill_prompts(prompts, class_nouns, generated.shape[0], placeholder)
    image = features.image_embeds(generated).float()  # (N, P)
    text = features.text_embeds(texts).float()  # (N, P)
    return (image * text).sum(dim=-1)


class _MeanOfScores(Metric):
    """Mean of per-image scores; sum states so DDP reduction is exact whatever the per-rank counts."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = -1.0
    plot_upper_bound = 1.0

    score_sum: Tensor
    n_images: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("n_images", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _accumulate(self, scores: Tensor) -> Tensor:
        self.score_sum += scores.to(self.score_sum).sum()
        self.n_images += scores.numel()
        return scores

    def compute(self) -> Tensor:
        """Mean score over every image seen (float32 scalar); NaN before any update."""
        if self.n_images == 0:
            return torch.tensor(float("nan"), device=self.score_sum.device)
        return (self.score_sum / self.n_images).float()


class IdentitySimilarity(_MeanOfScores):
    """CLIP-I (with :class:`ClipFeatures`) or DINO (with :class:`DinoFeatures`) identity similarity.

    Call :meth:`update` once per subject (or per batch of one subject): every generated image is compared with
    every real image of that subject.

    Args:
        features: the frozen feature extractor; it becomes a child module (moves with ``.to(device)``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    def __init__(self, features: ClipFeatures | DinoFeatures, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.features = features

    @property
    def name(self) -> str:
        """``"CLIP-I"`` or ``"DINO"``."""
        return "CLIP-I" if self.features.kind == "clip" else "DINO"

    def update(self, generated: Tensor, references: Tensor) -> None:
        """Adds generated images of one subject.

        Args:
            generated: (N, 3, H, W) generated images, float in [0, 1].
            references: (M, 3, H', W') real images of the same subject, float in [0, 1].
        """
        self._accumulate(identity_scores(self.features, generated, references))

    def describe(self) -> dict[str, Any]:
        """Metric name, backbone and preprocessing (from the features), pairing and aggregation."""
        return {"metric": self.name, **self.features.describe(), "pairing": IDENTITY_PAIRING}


class PromptSimilarity(_MeanOfScores):
    """CLIP-T prompt similarity: cosine between a generated image and its prompt with the class noun in place.

    Args:
        features: the frozen CLIP feature extractor (a child module).
        placeholder: default placeholder token in prompts (``<s*>``).
        **kwargs: forwarded to ``torchmetrics.Metric``.
    """

    def __init__(self, features: ClipFeatures, placeholder: str = PLACEHOLDER, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(features, ClipFeatures):
            raise TypeError(f"PromptSimilarity needs ClipFeatures, got {type(features).__name__}")
        self.features = features
        self.placeholder = placeholder

    name = "CLIP-T"

    def update(
        self,
        generated: Tensor,
        prompts: Sequence[str] | str,
        class_nouns: Sequence[str] | str,
        placeholder: str | None = None,
    ) -> None:
        """Adds generated images with their prompts.

        Args:
            generated: (N, 3, H, W) generated images, float in [0, 1].
            prompts: N prompts with the placeholder (or one prompt for all N images).
            class_nouns: N class nouns (or one), replacing the placeholder.
            placeholder: overrides the placeholder given at construction.

        Raises:
            ValueError: a prompt has no placeholder (the prompt is named).
        """
        self._accumulate(
            prompt_scores(self.features, generated, prompts, class_nouns, placeholder or self.placeholder)
        )

    def describe(self) -> dict[str, Any]:
        """Metric name, backbone and preprocessing (from the features), placeholder rule, pairing."""
        return {
            "metric": self.name,
            **self.features.describe(),
            "placeholder": self.placeholder,
            "text": "placeholder replaced by the subject's class noun",
            "pairing": PROMPT_PAIRING,
        }


class _PooledCLIP(nn.Module):
    """Adapts a transformers 5 ``CLIPModel`` to torchmetrics' ``CLIPScore``, which expects tensors from
    ``get_image_features`` / ``get_text_features`` (transformers 5 returns an output object)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values: Tensor) -> Tensor:
        return pooled_output(self.model.get_image_features(pixel_values=pixel_values))

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return pooled_output(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask))


def clipscore_for(features: ClipFeatures, **kwargs: Any) -> CLIPScore:
    """torchmetrics' ``CLIPScore`` on the same local CLIP backbone as ``features`` (for cross-checks).

    ``CLIPScore`` preprocesses with the Hugging Face processor, which rescales by 1/255: feed it **uint8**
    images (0..255), not [0, 1] floats. It reports ``100 * max(mean cosine, 0)``.

    Args:
        features: the CLIP features whose model, tokenizer and image processor are reused.
        **kwargs: forwarded to ``CLIPScore``.
    """
    model = _PooledCLIP(features.model)
    processor = CLIPProcessor(image_processor=features.image_processor, tokenizer=features.tokenizer)
    return CLIPScore(model_name_or_path=lambda: (model, processor), **kwargs)
