"""Per-item randomness, augmentation and tensor conversion shared by every dataset.

Every random choice made for a dataset item (crop, flip, prompt template) comes from a ``torch.Generator``
seeded by :func:`item_generator` from ``(seed, epoch, index)`` alone, never from a global RNG, so an item is
the same in every process, worker and run; this is what makes resuming mid-epoch exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from datamodules.images import (  # noqa: F401  (re-exported: their home before the split)
    MAX_UPSCALE,
    MIN_IMAGE_SIDE,
    ImageLoadError,
    ImageTooSmallError,
    SmallImageWarning,
    check_image_size,
    load_rgb,
    min_image_side,
    to_rgb,
)
from models.errors import ConfigurationError
from models.placeholder import DEFAULT_PLACEHOLDER

_MASK64 = (1 << 64) - 1

CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp")

# Textual-inversion-style templates (Gal et al. 2022, "imagenet_templates_small"); "{}" is the placeholder.
PROMPT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def item_seed(seed: int, epoch: int, index: int) -> int:
    """Mixes ``(seed, epoch, index)`` into one 64-bit seed (SplitMix64; no Python ``hash``, no collisions
    between neighbouring triples, identical on every platform and process).

    Args:
        seed: Run seed.
        epoch: Epoch number.
        index: Dataset index.

    Returns:
        A seed in ``[0, 2**63)``, valid for ``torch.Generator.manual_seed``.
    """
    x = _splitmix64(seed & _MASK64)
    x = _splitmix64(x ^ (epoch & _MASK64))
    x = _splitmix64(x ^ (index & _MASK64))
    return x >> 1


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator whose stream is a pure function of ``(seed, epoch, index)``."""
    return torch.Generator().manual_seed(item_seed(seed, epoch, index))


def split_index(index: int | tuple[int, int], default_epoch: int) -> tuple[int, int]:
    """Decodes a dataset index: ``i`` (uses the dataset's own epoch) or ``(epoch, i)`` as yielded by
    :class:`datamodules.pretrain.EpochSampler`, which carries the epoch into worker processes.

    Returns:
        ``(epoch, index)`` as ints.
    """
    if isinstance(index, (tuple, list)):
        epoch, i = index
        return int(epoch), int(i)
    return int(default_epoch), int(index)


def check_augment_args(scale: tuple[float, float], flip_p: float) -> None:
    """Raises ``ConfigurationError`` unless ``0 < scale[0] <= scale[1] <= 1`` and ``0 <= flip_p <= 1``."""
    if not (0.0 < scale[0] <= scale[1] <= 1.0):
        raise ConfigurationError(f"scale must satisfy 0 < min <= max <= 1, got {tuple(scale)}")
    if not (0.0 <= flip_p <= 1.0):
        raise ConfigurationError(f"flip_p must be in [0, 1], got {flip_p}")


def pick_template(templates: Sequence[str], generator: torch.Generator) -> str:
    """Draws one prompt template uniformly with ``generator`` (one draw)."""
    return templates[int(torch.randint(len(templates), (1,), generator=generator).item())]


def fill_prompt(template: str, placeholder: str) -> str:
    """Fills the ``{}`` slot of ``template`` with the placeholder string, e.g. ``"a photo of a <s*>"``."""
    return template.format(placeholder)


def resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Resizes the shortest side to ``size`` (bicubic) and center-crops ``size x size``.

    Matches ``CLIPImageProcessor`` (shortest edge, then center crop): the long side is
    ``int(size * long / short)`` and the crop offset is ``(long - size) // 2``.
    """
    w, h = img.size
    if (w, h) == (size, size):
        return img
    if w <= h:
        new_w, new_h = size, int(size * h / w)
    else:
        new_w, new_h = int(size * w / h), size
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return img.crop((left, top, left + size, top + size))


def augment(
    img: Image.Image,
    size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.8, 1.0),
    flip_p: float = 0.5,
    ratio: tuple[float, float] = (0.9, 1.1),
) -> Image.Image:
    """Random resized crop plus horizontal flip, drawing exactly five numbers from ``generator``.

    The crop covers ``s`` of the area of the largest square that fits (``s ~ U(scale)``), with a mild
    aspect jitter ``r ~ logU(ratio)``, at a uniform position, and is resized to ``size x size`` (bicubic);
    with ``ratio=(1, 1)`` the aspect is preserved exactly.

    Args:
        img: RGB image of any size.
        size: Output side in pixels.
        generator: Per-item generator (see :func:`item_generator`).
        scale: Range of the crop area relative to ``min(w, h) ** 2``, within ``(0, 1]``.
        flip_p: Probability of a horizontal flip.
        ratio: Range of the crop's width / height.

    Returns:
        An RGB image of size ``(size, size)``.
    """
    u = torch.rand(5, generator=generator, dtype=torch.float64).tolist()
    w, h = img.size
    side = min(w, h)
    area = scale[0] + (scale[1] - scale[0]) * u[0]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    r = math.exp(log_lo + (log_hi - log_lo) * u[1])
    cw = min(float(w), side * math.sqrt(area * r))
    ch = min(float(h), side * math.sqrt(area / r))
    left = u[2] * (w - cw)
    top = u[3] * (h - ch)
    out = img.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + cw, top + ch))
    if u[4] < flip_p:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return out


def pil_to_uint8_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor of shape ``(3, H, W)``."""
    arr = np.array(img.convert("RGB"), dtype=np.uint8, copy=True)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_diffusion_tensor(img: Image.Image, resolution: int) -> torch.Tensor:
    """VAE input: shortest side to ``resolution``, center crop, scaled to ``[-1, 1]``.

    Returns:
        float32 tensor of shape ``(3, resolution, resolution)``.
    """
    x = pil_to_uint8_tensor(resize_center_crop(img, resolution)).float()
    return x / 127.5 - 1.0


def to_clip_tensor(
    img: Image.Image,
    size: int,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """CLIP image-encoder input: shortest side to ``size`` (bicubic), center crop, ``/255``, ``(x-mean)/std``.

    Returns:
        float32 tensor of shape ``(3, size, size)``.
    """
    x = pil_to_uint8_tensor(resize_center_crop(img, size)).float() / 255.0
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean_t) / std_t


@dataclass(frozen=True)
class ViewSpec:
    """How one dataset item is made from an image: augmentation, the two tensor views, the prompt.

    Attributes:
        resolution: side R of ``pixel_values`` (VAE input).
        clip_size: side C of ``clip_pixel_values`` (image-encoder input).
        clip_mean: per-channel mean of the image encoder's normalisation.
        clip_std: per-channel std of the image encoder's normalisation.
        scale: random-resized-crop area range.
        flip_p: horizontal-flip probability.
        placeholder: pseudo-word in the prompts.
        templates: prompt templates with one ``{}``.
    """

    resolution: int = 32
    clip_size: int = 32
    clip_mean: tuple[float, ...] = CLIP_MEAN
    clip_std: tuple[float, ...] = CLIP_STD
    scale: tuple[float, float] = (0.8, 1.0)
    flip_p: float = 0.5
    placeholder: str = DEFAULT_PLACEHOLDER
    templates: tuple[str, ...] = tuple(PROMPT_TEMPLATES)

    def __post_init__(self) -> None:
        check_augment_args(self.scale, self.flip_p)

    @classmethod
    def build(
        cls,
        resolution: int,
        clip_size: int,
        clip_mean: Sequence[float],
        clip_std: Sequence[float],
        scale: Sequence[float],
        flip_p: float,
        placeholder: str,
        templates: Sequence[str] | None,
    ) -> ViewSpec:
        """From a dataset's arguments (sequences become tuples; ``templates=None`` means the defaults)."""
        tmpl = PROMPT_TEMPLATES if templates is None else templates
        return cls(
            resolution,
            clip_size,
            tuple(clip_mean),
            tuple(clip_std),
            tuple(scale),
            flip_p,
            placeholder,
            tuple(tmpl),
        )

    def item(self, img: Image.Image, generator: torch.Generator) -> dict[str, torch.Tensor | str]:
        """:func:`make_item` with these settings."""
        return make_item(
            img,
            generator,
            resolution=self.resolution,
            clip_size=self.clip_size,
            clip_mean=self.clip_mean,
            clip_std=self.clip_std,
            scale=self.scale,
            flip_p=self.flip_p,
            templates=self.templates,
            placeholder=self.placeholder,
        )


def make_item(
    img: Image.Image,
    generator: torch.Generator,
    *,
    resolution: int,
    clip_size: int,
    clip_mean: Sequence[float] = CLIP_MEAN,
    clip_std: Sequence[float] = CLIP_STD,
    scale: tuple[float, float] = (0.8, 1.0),
    flip_p: float = 0.5,
    templates: Sequence[str] = PROMPT_TEMPLATES,
    placeholder: str = DEFAULT_PLACEHOLDER,
) -> dict[str, torch.Tensor | str]:
    """Builds the image and prompt fields of one item from one augmented view.

    Draw order (fixed, part of the determinism contract): one template draw, then the five augmentation
    draws. Both tensors come from the same view, cropped at ``max(resolution, clip_size)`` then resized.

    Returns:
        ``{"pixel_values": (3, R, R) in [-1, 1], "clip_pixel_values": (3, C, C) normalised,
        "prompt": str}``.
    """
    prompt = fill_prompt(pick_template(templates, generator), placeholder)
    view = augment(img, max(resolution, clip_size), generator, scale=scale, flip_p=flip_p)
    return {
        "pixel_values": to_diffusion_tensor(view, resolution),
        "clip_pixel_values": to_clip_tensor(view, clip_size, clip_mean, clip_std),
        "prompt": prompt,
    }
