"""Loss terms are computed in float32 whatever the autocast state of the surrounding forward.

Under ``bf16-mixed`` / ``16-mixed`` the UNet and the trainable heads run in reduced precision, but a loss in bf16
rounds its value to ~3 significant digits and its masking constants (``finfo(float32).min``) overflow bf16.
Every loss module therefore runs its arithmetic inside :func:`full_precision` on ``.float()`` inputs.
"""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor


def full_precision(*tensors: Tensor) -> AbstractContextManager:
    """Context that disables autocast on the device type of ``tensors`` (CPU when none is given)."""
    device_type = tensors[0].device.type if tensors else "cpu"
    if device_type not in {"cpu", "cuda", "xpu", "mps", "hpu"}:
        device_type = "cpu"
    return torch.autocast(device_type=device_type, enabled=False)


def loss_dtype(*tensors: Tensor) -> torch.dtype:
    """float32, or float64 when an input already is float64 (reference tests in double precision)."""
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype) if t.is_floating_point() else dtype
    return dtype
