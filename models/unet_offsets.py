"""Dense UNet weight offsets: what full fine-tuning (DreamBooth, ``tune: [unet]``) changes, carried by a concept.

DreamBooth (Ruiz et al., CVPR 2023; diffusers' ``examples/dreambooth/train_dreambooth.py``) tunes every UNet weight.
Its concept is the difference between the tuned and the base UNet, ``dW = W_tuned - W_base`` for each parameter
that moved; the artefact stores it next to v* and sampling adds it to the base weights for the duration of one
call (:func:`applied_offsets`), so one loaded backbone samples any concept and the base is restored exactly.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


def unet_snapshot(unet: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every UNet parameter (the base a concept's offsets are taken against)."""
    return {n: p.detach().clone() for n, p in unet.named_parameters()}


def restore_unet(unet: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    """Copies a :func:`unet_snapshot` back in place (optimizer references stay valid)."""
    params = dict(unet.named_parameters())
    if params.keys() != snapshot.keys():
        raise ValueError("UNet snapshot does not match the UNet's parameters")
    with torch.no_grad():
        for name, value in snapshot.items():
            params[name].copy_(value)


def unet_offsets(unet: nn.Module, snapshot: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``W - W_base`` (float32, CPU) for every parameter that moved since ``snapshot``."""
    out = {}
    for name, param in unet.named_parameters():
        delta = param.detach().float() - snapshot[name].float()
        if bool(delta.any()):
            out[name] = delta.cpu().contiguous()
    return out


@contextlib.contextmanager
def applied_offsets(unet: nn.Module, offsets: dict[str, torch.Tensor]) -> Iterator[None]:
    """Adds ``offsets`` to the UNet's weights inside the block and restores the exact base weights after it.

    Raises:
        KeyError: an offset names a parameter the UNet does not have (a concept of another architecture).
    """
    if not offsets:
        yield
        return
    params = dict(unet.named_parameters())
    missing = sorted(set(offsets) - set(params))
    if missing:
        raise KeyError(f"UNet offsets for parameters this UNet does not have: {missing[:3]}")
    saved = {n: params[n].detach().clone() for n in offsets}
    try:
        with torch.no_grad():
            for name, delta in offsets.items():
                params[name].add_(delta.to(params[name].device, params[name].dtype))
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


class FullFineTuning:
    """A UNet tuned in full (DreamBooth): made trainable, its base weights and fingerprint kept.

    Args:
        unet: the backbone's UNet (every parameter becomes trainable).
        fingerprint: the base model's fingerprint, taken before tuning moves the weights it hashes.
    """

    def __init__(self, unet: nn.Module, fingerprint: str) -> None:
        unet.requires_grad_(True)
        self.unet, self.fingerprint, self.base = unet, fingerprint, unet_snapshot(unet)

    def reset(self) -> None:
        """The base weights back in place (the next concept starts from the base model)."""
        restore_unet(self.unet, self.base)

    def offsets(self) -> dict[str, torch.Tensor]:
        """What tuning changed so far (:func:`unet_offsets`)."""
        return unet_offsets(self.unet, self.base)
