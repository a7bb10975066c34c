"""FSDP for the personalization modules: shards the trainable units, keeps the frozen backbone out of checkpoints.

Lightning's :class:`~lightning.pytorch.strategies.FSDPStrategy` saves ``FSDP(model).state_dict()``, which walks the
modules itself: ``PersonalizationModule.state_dict``'s filter never runs, so a plain FSDP checkpoint would hold the
whole frozen Stable Diffusion. :class:`PersonalizationFSDPStrategy` drops the same keys the module drops.

Wrapping: FSDP only un-shards a unit's parameters inside that unit's ``forward``, so a unit may only be a module
whose parameters are used in its own forward. The policy wraps the modules the LightningModule lists in
``fsdp_wrap_modules()`` (the feature encoder, token embedder and hypernetwork trunk / heads, and the UNet's down,
mid and up blocks). Everything else (the hypernetwork's LoRA factors, read by the attention processors; the text
encoder, whose embedding table is read for the neighbour search; the VAE, called through ``encode``) stays in
the root unit, which FSDP un-shards for the whole training step.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


def _in_set(module: nn.Module, recurse: bool, nonwrapped_numel: int, wrap: frozenset[int]) -> bool:
    # FSDP's lambda/custom policy protocol: ``recurse=True`` asks whether to descend, False whether to wrap.
    return True if recurse else id(module) in wrap


class PersonalizationFSDPStrategy(FSDPStrategy):
    """:class:`FSDPStrategy` with the module's own wrap policy and checkpoints without the frozen backbone.

    Takes every argument of ``FSDPStrategy``; ``auto_wrap_policy`` defaults to the LightningModule's
    ``fsdp_wrap_modules()``. It is a subclass, which Lightning's accelerator check does not refuse on CPU
    (``strategy="fsdp"`` requires CUDA there), so ``accelerator: cpu`` with gloo runs it for tests.
    """

    def _setup_model(self, model: nn.Module) -> nn.Module:
        module = self.lightning_module
        if "auto_wrap_policy" not in self.kwargs and hasattr(module, "fsdp_wrap_modules"):
            wrap = frozenset(id(m) for m in module.fsdp_wrap_modules())
            self.kwargs["auto_wrap_policy"] = partial(_in_set, wrap=wrap)
        return super()._setup_model(model)

    def lightning_module_state_dict(self) -> dict[str, Any]:
        full = super().lightning_module_state_dict()
        keep = getattr(self.lightning_module, "checkpointed_key", None)
        if keep is None:
            return full
        return type(full)((k, v) for k, v in full.items() if keep(k))
