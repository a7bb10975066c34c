"""One device, and the module stays on it after ``fit``: for modules reused across many fits.

Lightning's ``Strategy.teardown`` moves the LightningModule back to the CPU after every ``fit``. The evaluation
(``evaluation.tuning.ConceptTuner``) and the benchmarks tune concept after concept with one module, so each
concept would pay a full-backbone host-to-device copy at set-up and the copy back at teardown, and a memory probe
started between two fits would see the model on the host. With :class:`ResidentStrategy` the first fit moves the
module (a no-op when it is already there) and later fits find it in place.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import SingleDeviceStrategy


class ResidentStrategy(SingleDeviceStrategy):
    """:class:`SingleDeviceStrategy` whose teardown leaves the module on its device.

    Usage: ``Trainer(accelerator="gpu", devices=1, strategy=ResidentStrategy(torch.device("cuda:0")))``.

    Args:
        device: the device the module lives on (``cpu``, ``cuda:1``, ...).
    """

    def __init__(self, device: torch.device | str = "cpu", **kwargs) -> None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            # Lightning's CUDA set-up calls torch.cuda.set_device(root_device), which refuses "cuda" without an index.
            device = torch.device("cuda", torch.cuda.current_device())
        super().__init__(device=device, **kwargs)

    def teardown(self) -> None:
        # Strategy.teardown without ``lightning_module.cpu()``; the optimizers belong to this fit only, so they
        # are released instead of copied to the host.
        self.optimizers = []
        self.precision_plugin.teardown()
        assert self.accelerator is not None
        self.accelerator.teardown()
        self.checkpoint_io.teardown()
