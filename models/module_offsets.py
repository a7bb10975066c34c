"""Per-sample LoRA offsets on the UNet's ResNet convolutions and feed-forward linears, beside attention's.

DATE's hypernetwork predicts ``dW_l = B_l · M_l(f) · A_l`` for attention projections (:mod:`models.attention`).
On worlds where an instance's colour, outline and pattern are drawn by the convolutions and feed-forward layers
(docs/research/instance_weights.md: full fine-tuning carries the instance, attention offsets do not), the same
low-rank form can target those layers too (``PersonalizerConfig.lora_modules``):

* ``ff``: each transformer block's feed-forward linears (``ff.net.0.proj``, ``ff.net.2``), offsets as for attention;
* ``resnet``: each ResNet's ``conv1`` and ``conv2``; ``A_l`` is a convolution with the layer's own kernel, stride
  and padding into r channels (LoCon's ``lora_down``), ``M_l`` mixes the r channels per sample, ``B_l`` is a 1 x 1
  convolution back (``lora_up``); flattened, ``A_l`` is (r, in x k x k) and ``B_l`` (out, r).

These layers run once per UNet call (not on DATE's two paths): their offsets apply at full strength whatever the
dual path's alpha, as full fine-tuning's do. The deltas reach the layers through forward hooks installed once per
backbone (:func:`install_module_offsets`) that read the deltas of the current call (:func:`active_offsets`, a
context variable set by ``DiffusionBackbone.denoise``); outside a call nothing is active and the hooks do nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

import torch
import torch.nn.functional as F
from torch import nn

from models.attention import LoraDelta

MODULE_KINDS = ("ff", "resnet")
FF_SUFFIXES = ("ff.net.0.proj", "ff.net.2")
RESNET_SUFFIXES = ("conv1", "conv2")

_ACTIVE: ContextVar[dict[str, LoraDelta] | None] = ContextVar("module_offsets", default=None)


def _kind(name: str, module: nn.Module) -> str | None:
    if isinstance(module, nn.Linear) and name.endswith(FF_SUFFIXES) and ".transformer_blocks." in name:
        return "ff"
    if isinstance(module, nn.Conv2d) and ".resnets." in name and name.endswith(RESNET_SUFFIXES):
        return "resnet"
    return None


def module_targets(unet: nn.Module, kinds: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """Offset targets of ``kinds`` (``ff``, ``resnet``): ``module name -> (fan_in, out)``, where a convolution's
    fan-in is ``in_channels x kernel height x kernel width``.

    Raises:
        ValueError: an unknown kind.
    """
    unknown = sorted(set(kinds) - set(MODULE_KINDS))
    if unknown:
        raise ValueError(f"lora_modules may name {list(MODULE_KINDS)}, got {unknown}")
    targets = {}
    for name, module in unet.named_modules():
        kind = _kind(name, module)
        if kind is None or kind not in kinds:
            continue
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            targets[name] = (module.in_channels * kh * kw, module.out_channels)
        else:
            targets[name] = (module.in_features, module.out_features)
    return targets


def conv_offset(module: nn.Conv2d, x: torch.Tensor, delta: LoraDelta) -> torch.Tensor:
    """Per-sample ``conv(x, dW_b)`` for x (B, C, H, W): ``A`` as a convolution into r channels with the layer's
    kernel, stride, padding and dilation, the (B, r, r) core per sample, ``B`` as a 1 x 1 convolution. Per-sample
    factors (``delta.per_sample``) run as one grouped convolution, a group per sample."""
    kh, kw = module.kernel_size
    if delta.per_sample:
        b, r = delta.down.shape[:2]
        down = delta.down.to(x.dtype).reshape(b * r, module.in_channels, kh, kw)
        h = F.conv2d(
            x.reshape(1, -1, *x.shape[2:]), down, None, module.stride, module.padding, module.dilation, b
        )
        h = torch.einsum("bij,bjhw->bihw", delta.core.to(x.dtype), h.reshape(b, r, *h.shape[2:]))
        return torch.einsum("boj,bjhw->bohw", delta.up.to(x.dtype), h)
    r = delta.down.shape[0]
    down = delta.down.to(x.dtype).reshape(r, module.in_channels, kh, kw)
    h = F.conv2d(x, down, None, module.stride, module.padding, module.dilation)
    h = torch.einsum("bij,bjhw->bihw", delta.core.to(x.dtype), h)
    return F.conv2d(h, delta.up.to(x.dtype).reshape(delta.up.shape[0], r, 1, 1))


def shaped_factors(
    unet: nn.Module, lora: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Static LoRA factors with each convolution's in the layout LoRA files hold (LoCon, peft):
    ``down`` (r, in, kh, kw), ``up`` (out, r, 1, 1); linear layers' stay (r, in), (out, r)."""
    out = {}
    for name, (down, up) in lora.items():
        module = unet.get_submodule(name)
        if isinstance(module, nn.Conv2d):
            r = down.shape[0]
            down = down.reshape(r, module.in_channels, *module.kernel_size)
            up = up.reshape(module.out_channels, r, 1, 1)
        out[name] = (down, up)
    return out


def _hook(name: str):
    def add_offset(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        deltas = _ACTIVE.get()
        delta = deltas.get(name) if deltas else None
        if delta is None:
            return output
        x = inputs[0]
        if isinstance(module, nn.Conv2d):
            return output + conv_offset(module, x, delta)
        return output + delta.apply(x)

    return add_offset


def install_module_offsets(unet: nn.Module) -> list[str]:
    """Installs the offset hook on every ``ff`` and ``resnet`` target of the UNet (once per backbone; a no-op
    outside :func:`active_offsets`). Returns the hooked module names."""
    names = []
    for name, module in unet.named_modules():
        if _kind(name, module) is not None:
            module.register_forward_hook(_hook(name))
            names.append(name)
    return names


@contextlib.contextmanager
def active_offsets(lora: dict[str, LoraDelta] | None) -> Iterator[None]:
    """Makes ``lora``'s deltas of hooked modules active for the UNet calls inside the block."""
    token = _ACTIVE.set(lora or None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
