"""The toy world's attribute checker: a small CNN that reads every attribute of a 32 px image, and the metric
built on it.

It is the exact, cheap metric of the toy evaluation: identity (shape, colour, pattern) and prompt adherence
(background, position, size). Saved as ``config.json`` + ``model.safetensors`` like a Hugging Face model and
loaded with :meth:`AttributeChecker.from_pretrained`. One scoring function, :func:`attribute_hits`, compares its
readings with the scenes asked for; :func:`checker_scores` (per image, the evaluation's columns) and
:func:`adherence` (per attribute, the model card's table) are views of it. :class:`CheckerMetric` plugs the
checker into ``evaluate.py run`` (``metrics.plugins``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from evaluation.concepts.base import EvalConcept
from evaluation.config import EvaluationConfigError
from evaluation.metrics.registry import Column, ImageMetric, register
from models.io import atomic_write_dir
from toyworld.named.world import ATTRIBUTES

IDENTITY_ATTRIBUTES = ("shape", "colour", "pattern")
PROMPT_ATTRIBUTES = ("background", "position", "size")
# Per-image columns: all identity attributes right (and each alone), all prompt attributes as asked (and each).
CHECKER_COLUMNS: tuple[Column, ...] = register(
    Column("identity_acc", "identity (checker)", table=True),
    *(Column(f"{a}_acc", a) for a in IDENTITY_ATTRIBUTES),
    Column("prompt_acc", "prompt (checker)", table=True),
    *(Column(f"{a}_acc", a) for a in PROMPT_ATTRIBUTES),
)


class AttributeChecker(nn.Module):
    """CNN over RGB plus two coordinate channels (they make position easy), one linear head per attribute.

    Args:
        classes: attribute name -> its class names, in label order (e.g. ``toyworld.named.world.VALUES``).
        width: channels of the first conv stage (doubled twice).
    """

    def __init__(self, classes: dict[str, list[str]], width: int = 32):
        super().__init__()
        self.classes = {k: list(v) for k, v in classes.items()}
        self.width = width
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            )

        self.features = nn.Sequential(
            block(5, w), nn.MaxPool2d(2), block(w, 2 * w), nn.MaxPool2d(2), block(2 * w, 4 * w)
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.heads = nn.ModuleDict({k: nn.Linear(4 * w * 4, len(v)) for k, v in self.classes.items()})

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """``pixels``: ``(B, 3, H, W)`` in [-1, 1]; returns logits per attribute."""
        b, _, h, w = pixels.shape
        ys = torch.linspace(-1, 1, h, device=pixels.device, dtype=pixels.dtype)
        xs = torch.linspace(-1, 1, w, device=pixels.device, dtype=pixels.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        coords = torch.stack([gx, gy]).expand(b, 2, h, w)
        f = self.pool(self.features(torch.cat([pixels, coords], 1))).flatten(1)
        return {k: head(f) for k, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, pixels: torch.Tensor) -> dict[str, list[str]]:
        """Class names per attribute for a batch of images in [-1, 1]."""
        logits = self(pixels)
        return {k: [self.classes[k][i] for i in v.argmax(-1).tolist()] for k, v in logits.items()}

    def save_pretrained(self, out_dir: str | Path) -> Path:
        def write(tmp: Path) -> None:
            (tmp / "config.json").write_text(
                json.dumps({"classes": self.classes, "width": self.width}, indent=1)
            )
            save_file(
                {k: v.detach().contiguous() for k, v in self.state_dict().items()}, tmp / "model.safetensors"
            )

        return atomic_write_dir(out_dir, write)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> AttributeChecker:
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"no attribute checker at {path} (config.json missing)")
        cfg = json.loads((path / "config.json").read_text())
        model = cls(cfg["classes"], cfg["width"])
        state = {k: v.float() for k, v in load_file(path / "model.safetensors").items()}
        model.load_state_dict(state)
        return model.eval()


def attribute_hits(
    readings: dict[str, list[str]], wanted: Sequence[dict[str, str]]
) -> dict[str, list[float]]:
    """Per attribute, per image: 1.0 where the reading equals the scene asked for, else 0.0.

    Args:
        readings: the checker's class name per attribute, each a list of N (``AttributeChecker.predict``).
        wanted: N scenes asked for.

    Raises:
        ValueError: readings and wanted scenes differ in length.
    """
    n = len(wanted)
    if any(len(readings[a]) != n for a in ATTRIBUTES):
        raise ValueError(f"readings and wanted scenes differ in length ({n} wanted)")
    return {a: [float(readings[a][i] == wanted[i][a]) for i in range(n)] for a in ATTRIBUTES}


def checker_scores(
    readings: dict[str, list[str]], wanted: Sequence[dict[str, str]]
) -> dict[str, list[float]]:
    """Per-image 0/1 scores of the checker's readings against the wanted scenes (shape, colour, pattern: the
    concept's identity; background, position, size: the prompt's context).

    Returns:
        ``{column: [N floats in {0, 1}]}`` for every column of :data:`CHECKER_COLUMNS`.
    """
    hit = attribute_hits(readings, wanted)
    n = len(wanted)
    out = {f"{a}_acc": hit[a] for a in hit}
    out["identity_acc"] = [float(all(hit[a][i] for a in IDENTITY_ATTRIBUTES)) for i in range(n)]
    out["prompt_acc"] = [float(all(hit[a][i] for a in PROMPT_ATTRIBUTES)) for i in range(n)]
    return {c.name: out[c.name] for c in CHECKER_COLUMNS}


def adherence(readings: dict[str, list[str]], wanted: Sequence[dict[str, str]]) -> dict[str, float]:
    """Share of images whose attribute equals the one asked for, per attribute."""
    return {a: sum(v) / len(v) for a, v in attribute_hits(readings, wanted).items()}


@torch.no_grad()
def read_attributes(checker: AttributeChecker, images: Tensor) -> dict[str, list[str]]:
    """The checker's reading of every attribute of ``images`` in [-1, 1]."""
    return checker.predict(images.float())


class CheckerMetric(ImageMetric):
    """The attribute checker as an evaluation metric on generated images in [0, 1]: per image, identity
    accuracy (shape, colour, pattern all as the concept's; and each alone) and prompt accuracy (background,
    position, size all as asked; and each alone). Its identity-vs-prompt plot is the run's main ``tradeoff.png``.

    Args:
        path: checker folder (``AttributeChecker.save_pretrained``), e.g. ``assets/toyworld/checker``.
    """

    name = "checker"
    columns = CHECKER_COLUMNS
    plot = (
        "prompt_acc",
        "identity_acc",
        "Checker: identity vs prompt accuracy (points: tuning steps; bars: 95% CI)",
    )

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self.size = 32  # the world's resolution, which the checker was trained at
        self.model: AttributeChecker | None = None

    def settings(self) -> dict[str, Any]:
        return {"path": self.path}

    def check(self, concepts: Sequence[EvalConcept]) -> None:
        if not Path(self.path).is_dir():
            raise EvaluationConfigError(f"metrics.plugins: checker {self.path} is not a folder")
        if any(c.attributes is None for c in concepts):
            raise EvaluationConfigError(
                "the attribute checker needs concepts with checked attributes (toyworld.ToyWorldConcepts)"
            )

    def load(self, device: str = "cpu") -> CheckerMetric:
        self.model = AttributeChecker.from_pretrained(self.path).float().eval().to(device)
        self.model.requires_grad_(False)
        return self

    @torch.no_grad()
    def read(self, images: Tensor) -> dict[str, list[str]]:
        """The checker's reading of (N, 3, H, W) images in [0, 1] (resized to 32 px if needed)."""
        if self.model is None:
            self.load()
        assert self.model is not None
        x = images.float().to(next(self.model.parameters()).device)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.model.predict(x * 2 - 1)

    def score(
        self, images: Tensor, concept: EvalConcept, prompt_indices: Sequence[int]
    ) -> dict[str, list[float]]:
        """:func:`checker_scores` of the checker's readings of ``images`` against the scenes their prompts ask."""
        assert concept.attributes is not None
        return checker_scores(self.read(images), [concept.attributes[i] for i in prompt_indices])

    def describe(self) -> dict[str, Any]:
        return {
            "backbone": self.path,
            "preprocessing": f"[0, 1] -> resized to {self.size} px (bilinear, antialiased) -> [-1, 1]",
            "pairing": "each image against the scene its prompt asked for: identity = shape, colour and "
            "pattern all the concept's; prompt = background, position and size all as the prompt says",
        }
