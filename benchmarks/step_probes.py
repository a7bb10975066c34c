"""Training-step callbacks of ``benchmarks.real_shape``: per-step time and peak memory, and a profiled step split
into named ranges (VAE encode, text encoder, attention layers, UNet forward, backward)."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning import Callback
from torch.autograd.profiler import record_function

from benchmarks.common import PeakMemory, sync

GIB = 2**30
RANGES = ("vae_encode", "text_encoder_forward", "attention_forward", "unet_forward", "backward")


class StepProbe(Callback):
    """Wall time and peak memory of every training step, and the time from fit start to the first step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.steps: list[dict[str, float]] = []
        self.to_first_step = self.to_first_step_cpu = 0.0
        self.clock = "cpu_s" if device.type == "cpu" else "seconds"

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_start, self._fit_cpu = time.perf_counter(), time.process_time()

    def on_train_start(self, trainer, pl_module) -> None:
        sync(self.device)
        self.to_first_step = time.perf_counter() - self._fit_start
        self.to_first_step_cpu = time.process_time() - self._fit_cpu

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._probe = PeakMemory(self.device)
        self._probe.start()
        sync(self.device)
        self._begin, self._cpu = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        seconds, cpu = time.perf_counter() - self._begin, time.process_time() - self._cpu
        self.steps.append({"seconds": seconds, "cpu_s": cpu, "peak_gib": self._probe.peak_bytes() / GIB})


class ProfileStep(Callback):
    """Runs step ``step`` under ``torch.profiler`` with named ranges around the parts of a DATE step.

    Ranges come from forward hooks (VAE encoder, text encoder, every attention layer, the UNet) and from the
    backward hooks of the Lightning loop; the profile's inclusive CPU time of each range is its cost.
    """

    def __init__(self, step: int) -> None:
        self.step = step
        self.result: dict[str, Any] = {}

    def _ranges(self, module: torch.nn.Module, name: str) -> list:
        stack: list = []

        def pre(*_: Any) -> None:
            stack.append(record_function(name))
            stack[-1].__enter__()

        def post(*_: Any) -> None:
            stack.pop().__exit__(None, None, None)

        return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx != self.step:
            return
        bb = pl_module.backbone
        self._hooks = self._ranges(bb.vae.encoder, "vae_encode") + self._ranges(bb.unet, "unet_forward")
        # models.placeholder.run_text_model calls the encoder's layers one by one (not encoder.forward)
        for layer in getattr(bb.text_encoder, "text_model", bb.text_encoder).encoder.layers:
            self._hooks += self._ranges(layer, "text_encoder_forward")
        for module in bb.unet.modules():
            if type(module).__name__ == "Attention":
                self._hooks += self._ranges(module, "attention_forward")
        self._prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        self._prof.__enter__()
        self._begin = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if hasattr(self, "_prof") and not self.result:
            self._backward = record_function("backward")
            self._backward.__enter__()

    def on_after_backward(self, trainer, pl_module) -> None:
        if hasattr(self, "_backward") and not self.result:
            self._backward.__exit__(None, None, None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx != self.step:
            return
        total = time.perf_counter() - self._begin
        self._prof.__exit__(None, None, None)
        for h in self._hooks:
            h.remove()
        events = self._prof.key_averages()
        inclusive = {name: 0.0 for name in RANGES}
        for e in events:
            if e.key in inclusive:
                inclusive[e.key] += e.cpu_time_total / 1e6
        ops = sorted((e for e in events if e.key not in inclusive), key=lambda e: -e.self_cpu_time_total)
        self_total = sum(e.self_cpu_time_total for e in events) / 1e6
        self.result = {
            "step_s": total,
            "ranges_s": inclusive,
            "top_ops": [
                {"op": e.key, "self_s": e.self_cpu_time_total / 1e6, "calls": e.count} for e in ops[:15]
            ],
            "self_total_s": self_total,
        }
