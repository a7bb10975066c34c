"""The toy world's attribute checker: a small CNN that reads every attribute of a 32 px image.

It is the exact, cheap metric of the toy evaluation: identity (shape, colour, pattern) and prompt adherence
(background, position, size). Saved as ``config.json`` + ``model.safetensors`` like a Hugging Face model and
loaded with :meth:`AttributeChecker.from_pretrained`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from models.io import atomic_write_dir


class AttributeChecker(nn.Module):
    """CNN over RGB plus two coordinate channels (they make position easy), one linear head per attribute.

    Args:
        classes: attribute name -> its class names, in label order (e.g. ``datamodules.toyworld.VALUES``).
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
