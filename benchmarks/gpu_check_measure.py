"""Measuring and reporting for the GPU check (``benchmarks/gpu_check.py``): the callback timing every training
step (the runs load it by class path), a check's peak memory, and the runner that prints one line per check and
collects the JSON."""

from __future__ import annotations

import contextlib
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning import Callback

from benchmarks.common import _status_kib, release_free_memory, sync

GIB = 2**30


class StepTimer(Callback):
    """Wall seconds of every training step, synchronised on the device.

    Args:
        device: ``cpu`` or ``cuda`` (``cuda:N``).
    """

    def __init__(self, device: str = "cpu") -> None:
        self.device = torch.device(device)
        self.seconds: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sync(self.device)
        self._begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        sync(self.device)
        self.seconds.append(time.perf_counter() - self._begin)


class Peak:
    """Absolute peak memory of a stretch of code: CUDA max allocated, or this process's peak resident set."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            release_free_memory()
            with contextlib.suppress(OSError):  # no resettable mark: the process's peak so far
                Path("/proc/self/clear_refs").write_text("5")

    def gib(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) / GIB
        return (_status_kib("VmHWM") or 0) * 1024 / GIB


class Checks:
    """Runs named checks, prints one line per check, collects the JSON."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.results: dict[str, dict[str, Any]] = {}

    def run(self, name: str, fn: Callable[[], dict[str, Any]], needs: tuple[str, ...] = ()) -> dict[str, Any]:
        failed = [n for n in needs if not self.results.get(n, {}).get("ok")]
        if failed:
            out = {"ok": False, "skipped": f"needs {', '.join(failed)}"}
            print(f"gpu_check: {name}: SKIPPED (needs {', '.join(failed)})", flush=True)
            self.results[name] = out
            return out
        peak = Peak(self.device)
        begin = time.perf_counter()
        try:
            out = {"ok": True, **fn()}
        except Exception as err:  # a check's failure is reported, the next checks still run
            out = {"ok": False, "error": " ".join(f"{type(err).__name__}: {err}".split())[:500]}
            out["traceback"] = traceback.format_exc()[-4000:]
        out["seconds"] = time.perf_counter() - begin
        out["peak_gib"] = peak.gib()
        self.results[name] = out
        summary = out.pop("line", "") if out["ok"] else out["error"]
        status = "ok" if out["ok"] else "FAIL"
        print(
            f"gpu_check: {name}: {status} ({out['seconds']:.1f} s, peak {out['peak_gib']:.2f} GiB) {summary}",
            flush=True,
        )
        return out


def _step_times(cli) -> list[float]:
    """The step times the CLI's :class:`StepTimer` recorded."""
    return next(c for c in cli.trainer.callbacks if isinstance(c, StepTimer)).seconds


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
