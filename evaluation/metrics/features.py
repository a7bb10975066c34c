"""Frozen feature extractors for evaluation: CLIP (CLIP-I, CLIP-T) and DINO (DINO image similarity).

Both load with ``from_pretrained`` from a local folder or a cached hub id (``openai/clip-vit-large-patch14``,
``facebook/dino-vits16``; ``python -m evaluation.metrics.tiny_models`` writes tiny offline stand-ins). Preprocessing is
done in torch on batched ``[0, 1]`` tensors, following the settings of the backbone's own
``preprocessor_config.json`` (resize, center crop, normalisation), so that generated images never go through
PIL/uint8 quantisation and every number can be reported with the exact preprocessing that produced it
(:meth:`describe`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoImageProcessor, AutoModel, CLIPModel

from models.clip_tokenizer import load_clip_tokenizer

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# PIL resampling codes used in preprocessor configs -> torch interpolation modes.
_RESAMPLE_TO_MODE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


@dataclass(frozen=True)
class Preprocessing:
    """Torch image preprocessing mirroring a Hugging Face image processor (resize, center crop, normalise).

    Attributes:
        resize_mode: ``"shortest_edge"`` (keep aspect, shorter side to ``resize_size[0]``) or ``"exact"``
            (resize to ``resize_size`` = (height, width), aspect not kept, as ``ViTImageProcessor`` does).
        resize_size: target of the resize, see ``resize_mode``.
        crop_size: (height, width) of the center crop, or ``None`` for no crop.
        interpolation: torch interpolation mode (``"bicubic"``, ``"bilinear"`` or ``"nearest"``).
        antialias: whether downscaling is antialiased (as PIL always is).
        mean: per-channel normalisation mean (RGB).
        std: per-channel normalisation std (RGB).
        source: where the settings came from (``"preprocessor_config.json"`` or ``"default"``).
    """

    resize_mode: str
    resize_size: tuple[int, ...]
    crop_size: tuple[int, int] | None
    interpolation: str
    antialias: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str

    @classmethod
    def from_processor(cls, processor: Any) -> Preprocessing:
        """Reads the settings of a (PIL or torchvision backend) Hugging Face image processor."""
        size = dict(processor.size) if processor.do_resize else {}
        if size.get("shortest_edge"):
            mode, resize = "shortest_edge", (int(size["shortest_edge"]),)
        elif size.get("height") and size.get("width"):
            mode, resize = "exact", (int(size["height"]), int(size["width"]))
        elif not size:
            mode, resize = "none", ()
        else:
            raise ValueError(f"unsupported image processor size {size}")
        crop = None
        if getattr(processor, "do_center_crop", False) and processor.crop_size is not None:
            crop_dict = dict(processor.crop_size)
            crop = (int(crop_dict["height"]), int(crop_dict["width"]))
        mean = tuple(float(m) for m in processor.image_mean) if processor.do_normalize else (0.0, 0.0, 0.0)
        std = tuple(float(s) for s in processor.image_std) if processor.do_normalize else (1.0, 1.0, 1.0)
        mode_name = _RESAMPLE_TO_MODE.get(int(processor.resample), "bicubic")
        return cls(
            mode, resize, crop, mode_name, mode_name != "nearest", mean, std, "preprocessor_config.json"
        )

    def __call__(self, images: Tensor) -> Tensor:
        """Preprocesses a batch of images.

        Args:
            images: (N, 3, H, W) float in [0, 1], or uint8 in [0, 255].

        Returns:
            (N, 3, h, w) float32 normalised pixel values at the backbone's input size.
        """
        x = _check_images(images)
        if self.resize_mode != "none":
            height, width = x.shape[-2:]
            if self.resize_mode == "shortest_edge":
                short = self.resize_size[0]
                # Same rounding as transformers' get_resize_output_image_size (truncation of the long side).
                if height <= width:
                    target = (short, int(short * width / height))
                else:
                    target = (int(short * height / width), short)
            else:
                target = (self.resize_size[0], self.resize_size[1])
            if target != (height, width):
                kwargs = {"antialias": self.antialias} if self.interpolation != "nearest" else {}
                x = F.interpolate(x, size=target, mode=self.interpolation, **kwargs)
                if self.interpolation == "bicubic":
                    x = x.clamp(0.0, 1.0)  # bicubic overshoots; PIL clips to the uint8 range too
        if self.crop_size is not None:
            x = _center_crop(x, self.crop_size)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly description of the settings."""
        return asdict(self)


def _check_images(images: Tensor) -> Tensor:
    """Validates an image batch and returns it as float32 in [0, 1], shape (N, 3, H, W)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape (N, 3, H, W), got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    x = images.float()
    if x.numel() and (x.min() < -1e-3 or x.max() > 1 + 1e-3):
        raise ValueError(
            f"expected float images in [0, 1], got values in [{x.min().item():.3f}, {x.max().item():.3f}] "
            "(convert [-1, 1] or [0, 255] images first)"
        )
    return x.clamp(0.0, 1.0)


def _center_crop(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Center crop (N, C, H, W) -> (N, C, h, w), padding with zeros if the image is smaller (as HF does)."""
    crop_h, crop_w = size
    height, width = x.shape[-2:]
    if height < crop_h or width < crop_w:
        pad_h, pad_w = max(crop_h - height, 0), max(crop_w - width, 0)
        x = F.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        height, width = x.shape[-2:]
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    return x[..., top : top + crop_h, left : left + crop_w]


def pooled_output(output: Tensor | Any) -> Tensor:
    """transformers 5 returns an output object from ``get_*_features``; older versions a tensor."""
    return output if isinstance(output, Tensor) else output.pooler_output


def _not_found(name_or_path: str | Path, what: str, err: Exception) -> OSError:
    return OSError(
        f"could not load the {what} from {str(name_or_path)!r} ({err.__class__.__name__}); it is neither a local "
        "folder nor in the Hugging Face cache (HF_HUB_OFFLINE=1?): pass a local folder"
    )


class _FrozenFeatures(nn.Module):
    """Common part of the feature extractors: frozen weights, eval mode forever, batched no-grad encoding."""

    kind: str = ""

    def __init__(self, name_or_path: str | Path, batch_size: int) -> None:
        super().__init__()
        self.name_or_path = str(name_or_path)
        self.batch_size = batch_size
        self.preprocessing: Preprocessing

    def _freeze(self) -> None:
        self.requires_grad_(False)
        self.train(False)

    def train(self, mode: bool = True) -> _FrozenFeatures:
        """Ignores ``mode``: the backbone stays in eval mode even inside a LightningModule being trained."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _encode_images(self, pixel_values: Tensor) -> Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def image_embeds(self, images: Tensor) -> Tensor:
        """Embeds images.

        Args:
            images: (N, 3, H, W) float in [0, 1] (or uint8), any size; resized as in :meth:`describe`.

        Returns:
            (N, P) float32 L2-normalised embeddings.
        """
        chunks = []
        for start in range(0, images.shape[0], self.batch_size):
            pixels = self.preprocessing(images[start : start + self.batch_size].to(self.device))
            dtype = next(self.parameters()).dtype
            chunks.append(self._encode_images(pixels.to(dtype)).float())
        if not chunks:
            raise ValueError("image_embeds needs at least one image")
        return F.normalize(torch.cat(chunks), dim=-1)

    def describe(self) -> dict[str, Any]:
        """What produced the embeddings: backbone, its class, input size and preprocessing."""
        return {
            "kind": self.kind,
            "backbone": self.name_or_path,
            "model_class": self.model.__class__.__name__,
            "preprocessing": self.preprocessing.as_dict(),
        }


class ClipFeatures(_FrozenFeatures):
    """CLIP image and text embeddings (projected, L2-normalised) for CLIP-I and CLIP-T.

    Args:
        name_or_path: local folder or cached hub id holding a ``CLIPModel``, its tokenizer and
            ``preprocessor_config.json`` (e.g. ``openai/clip-vit-large-patch14``).
        batch_size: images or prompts encoded per forward pass.
        tokenizer_path: where the tokenizer lives if not in ``name_or_path``.
        processor_path: where ``preprocessor_config.json`` lives if not in ``name_or_path``.

    Raises:
        OSError: the backbone is neither a local folder nor cached ("pass a local folder").
        ValueError: the tokenizer is not the full 49,408-entry CLIP tokenizer.
    """

    kind = "clip"

    def __init__(
        self,
        name_or_path: str | Path,
        batch_size: int = 64,
        tokenizer_path: str | Path | None = None,
        processor_path: str | Path | None = None,
    ) -> None:
        super().__init__(name_or_path, batch_size)
        try:
            # float32 whatever the files hold (the toy world's CLIP is saved in fp16; CPU fp16 is slow and lossy)
            model = CLIPModel.from_pretrained(str(name_or_path), dtype=torch.float32)
        except OSError as err:
            raise _not_found(name_or_path, "CLIP model", err) from err
        try:
            self.image_processor = AutoImageProcessor.from_pretrained(
                str(processor_path or name_or_path), backend="pil"
            )
            self.tokenizer = load_clip_tokenizer(tokenizer_path or name_or_path)
        except OSError as err:
            raise _not_found(name_or_path, "CLIP tokenizer / preprocessor_config.json", err) from err
        self.model = model
        self.preprocessing = Preprocessing.from_processor(self.image_processor)
        # Truncate prompts to what both the tokenizer and the position table allow (77 for every CLIP).
        self.max_length = min(
            self.tokenizer.model_max_length, model.config.text_config.max_position_embeddings
        )
        self._freeze()

    def _encode_images(self, pixel_values: Tensor) -> Tensor:
        return pooled_output(self.model.get_image_features(pixel_values=pixel_values))

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> Tensor:
        """Embeds prompts.

        Args:
            texts: N prompts (truncated to the CLIP context length, 77 tokens).

        Returns:
            (N, P) float32 L2-normalised embeddings.
        """
        if isinstance(texts, str) or not texts:
            raise ValueError("text_embeds expects a non-empty list of strings")
        chunks = []
        for start in range(0, len(texts), self.batch_size):
            tokens = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding="max_length",
                max_length=self.max_length,
                truncation=True,
                return_tensors="pt",
            ).to(self.device)
            out = self.model.get_text_features(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            )
            chunks.append(pooled_output(out).float())
        return F.normalize(torch.cat(chunks), dim=-1)

    def describe(self) -> dict[str, Any]:
        """Backbone, projection size, image size, preprocessing and text context length."""
        info = super().describe()
        info.update(
            embed_dim=self.model.config.projection_dim,
            image_size=self.model.config.vision_config.image_size,
            text_max_length=self.max_length,
        )
        return info


class DinoFeatures(_FrozenFeatures):
    """DINO-style ViT image embeddings: the final-layer CLS token, L2-normalised (DreamBench's DINO metric).

    Args:
        name_or_path: local folder or cached hub id of a ``ViTModel`` / ``Dinov2Model`` (e.g.
            ``facebook/dino-vits16``). Its ``preprocessor_config.json`` is followed if present; otherwise
            images are resized (shorter side, bicubic) and center-cropped to ``config.image_size`` and
            normalised with ImageNet mean/std.
        batch_size: images encoded per forward pass.

    Raises:
        OSError: the backbone is neither a local folder nor cached ("pass a local folder").
    """

    kind = "dino"

    def __init__(self, name_or_path: str | Path, batch_size: int = 64) -> None:
        super().__init__(name_or_path, batch_size)
        try:
            model = AutoModel.from_pretrained(str(name_or_path))
        except OSError as err:
            raise _not_found(name_or_path, "DINO/ViT model", err) from err
        self.model = model
        try:
            processor = AutoImageProcessor.from_pretrained(str(name_or_path), backend="pil")
            self.preprocessing = Preprocessing.from_processor(processor)
        except (OSError, ValueError):
            size = int(model.config.image_size)
            self.preprocessing = Preprocessing(
                "shortest_edge",
                (size,),
                (size, size),
                "bicubic",
                True,
                IMAGENET_MEAN,
                IMAGENET_STD,
                "default",
            )
        self._freeze()

    def _encode_images(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]

    def describe(self) -> dict[str, Any]:
        """Backbone, embedding (CLS token of the last layer), width, image size and preprocessing."""
        info = super().describe()
        info.update(
            embedding="CLS token of last_hidden_state",
            embed_dim=self.model.config.hidden_size,
            image_size=self.model.config.image_size,
        )
        return info
