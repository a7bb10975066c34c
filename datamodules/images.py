"""Reading images: any format to RGB, one-line errors naming the file, and the size a concept image needs."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from models.errors import MissingFileError, TuningEncoderError

# A concept image is upscaled at most this much to the model's resolution, and never used below MIN_IMAGE_SIDE:
# past that, bicubic interpolation blur is what the VAE and the image encoder see, not the concept (at 16 px an
# SD latent is 2 x 2 cells).
MAX_UPSCALE = 4
MIN_IMAGE_SIDE = 16

_ALPHA_MODES = {"RGBA", "LA", "PA", "RGBa", "La"}


class ImageLoadError(TuningEncoderError, ValueError):
    """An image file that exists but cannot be decoded (corrupt, truncated, unsupported).

    Args:
        path: The offending file.
        reason: Why it failed (one line).
    """

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = " ".join(str(reason).split()) or "unknown error"
        super().__init__(f"cannot load image {self.path}: {self.reason}")


class ImageTooSmallError(TuningEncoderError, ValueError):
    """A concept image too small to tune on (see :func:`check_image_size`)."""


class SmallImageWarning(UserWarning):
    """A concept image smaller than the model's resolution: it is upscaled, so detail is interpolated."""


def min_image_side(resolution: int) -> int:
    """Smallest accepted short side at ``resolution``: ``resolution / MAX_UPSCALE``, at least ``MIN_IMAGE_SIDE``
    (never above ``resolution`` itself)."""
    return min(int(resolution), max(MIN_IMAGE_SIDE, math.ceil(resolution / MAX_UPSCALE)))


def check_image_size(size: tuple[int, int], resolution: int, source: str) -> None:
    """Warns if an image's short side is below ``resolution``; refuses it below :func:`min_image_side`.

    Args:
        size: ``(width, height)`` in pixels.
        resolution: the model's pixel resolution (the short side is resized to it).
        source: what the image is, for the message (e.g. its path).

    Raises:
        ImageTooSmallError: the short side is below ``min_image_side(resolution)``.
    """
    w, h = (int(v) for v in size)
    floor = min_image_side(resolution)
    if min(w, h) < floor:
        raise ImageTooSmallError(
            f"concept image {source} is {w}x{h} px, too small for resolution {resolution}: its short side must be "
            f">= {floor} px (upscaling more than {MAX_UPSCALE}x, or below {MIN_IMAGE_SIDE} px, leaves only "
            f"interpolation blur to learn from)"
        )
    if min(w, h) < resolution:
        warnings.warn(
            SmallImageWarning(
                f"concept image {source} is {w}x{h} px, smaller than the model's resolution {resolution}: "
                f"it is upscaled {resolution / min(w, h):.1f}x, so fine detail is interpolated"
            ),
            stacklevel=2,
        )


def to_rgb(img: Image.Image) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB.

    Transparency (alpha channel or a palette/gray ``transparency`` entry) is composited onto white;
    16- and 32-bit integer gray (``I;16*``, ``I``) is rescaled to 8 bits; float gray (``F``) in ``[0, 1]`` is
    scaled by 255; palette, 1-bit, gray, CMYK and YCbCr go through PIL's own conversion.

    Args:
        img: Any PIL image (already loaded).

    Returns:
        An ``RGB`` image of the same size.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img).astype(np.float64)
        peak = float(arr.max()) if arr.size else 0.0
        if mode == "F" and peak <= 1.0:
            arr = arr * 255.0
        elif mode.startswith("I;16") or 255.0 < peak <= 65535.0:
            arr = arr / 257.0
        elif peak > 65535.0:
            arr = arr * (255.0 / peak)
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Reads an image file fully into memory as 8-bit RGB (EXIF orientation applied).

    Args:
        path: Image file.

    Returns:
        An ``RGB`` PIL image.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ImageLoadError: the file cannot be decoded (not an image, corrupt, truncated, unsupported mode).
    """
    path = Path(path)
    if path.is_dir():
        raise ImageLoadError(path, "it is a folder, not an image file (name one image in it)")
    if not path.is_file():
        raise MissingFileError(f"image file not found: {path}")
    try:
        with Image.open(path) as img:
            img.load()  # decoding is lazy: truncation and corruption only surface here
            try:
                oriented = ImageOps.exif_transpose(img)
            except Exception:  # a broken EXIF block should not cost us the pixels
                oriented = img
            return to_rgb(oriented).copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageLoadError(path, f"{type(err).__name__}: {err}") from err
