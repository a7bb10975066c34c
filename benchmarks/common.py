"""Helpers shared by the benchmarks: timing with device sync, peak-memory probes, machine notes, markdown.

Peak memory on CPU. PyTorch's CPU allocator keeps no statistics and ``tracemalloc`` does not see its
allocations, so we use the kernel's resident-set high-water mark: free heap pages are first handed back to the
OS (``gc.collect`` + glibc ``malloc_trim``), the mark is reset (``"5"`` into ``/proc/self/clear_refs``, Linux
>= 4.0), and the peak is ``VmHWM - VmRSS`` read before the measured code. Run it in a fresh process: glibc keeps
freed pages for reuse, so a second measurement in the same process under-reports. On CUDA the peak is
``torch.cuda.max_memory_allocated`` above the allocation before the measured code (the caching allocator's
reserve is not counted).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

MIB = 2**20


def sync(device: torch.device) -> None:
    """Waits for queued kernels, so a wall-clock interval covers the work it launched."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds taken by ``fn()``, synchronised on ``device`` before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def timed_cpu(fn: Callable[[], object], device: torch.device) -> tuple[float, float]:
    """``(wall seconds, CPU seconds of this process)`` taken by ``fn()``, synchronised on ``device``.

    On a CPU core shared with other jobs the wall time grows with their load, while this process's CPU time
    (all its threads) stays close to the work done: with one torch thread it is the contention-free step time.
    """
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def summary(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles, min, max and count of a sample (medians are what the tables report)."""
    vals = sorted(values)
    if len(vals) >= 2:
        q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
    else:
        q1 = q3 = vals[0]
    return {
        "median": statistics.median(vals),
        "q1": q1,
        "q3": q3,
        "min": vals[0],
        "max": vals[-1],
        "n": len(vals),
    }


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def release_free_memory() -> None:
    """Collects garbage and returns free heap pages to the OS (glibc only; a no-op elsewhere)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakMemory:
    """Peak memory of a stretch of code above its starting level, in bytes.

    Usage: ``probe = PeakMemory(device); probe.start(); ...; probe.peak_bytes()``.

    Args:
        device: CUDA: allocated tensor memory (``torch.cuda`` statistics). CPU: process RSS (see module doc).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated above the allocation before the measured steps"
            return
        release_free_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as err:
            raise RuntimeError(
                "peak RSS needs a resettable high-water mark (Linux /proc/self/clear_refs); "
                f"not available here: {err}"
            ) from err
        rss = _status_kib("VmRSS")
        if rss is None:
            raise RuntimeError("cannot read VmRSS from /proc/self/status")
        self.base = rss * 1024
        self.method = (
            "peak RSS (VmHWM, reset through /proc/self/clear_refs after malloc_trim) above the RSS before the "
            "measured steps, in a fresh process per method"
        )

    def peak_bytes(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device) - self.base)
        return int((_status_kib("VmHWM") or 0) * 1024 - self.base)


def rss_bytes() -> int:
    """Current resident set size of this process (0 where /proc is unavailable)."""
    return (_status_kib("VmRSS") or 0) * 1024


def machine_notes(device: torch.device) -> dict[str, object]:
    """What produced the numbers: library versions, threads, CPU or GPU, load at the time."""
    notes: dict[str, object] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        notes["gpu"] = torch.cuda.get_device_name(device)
    return notes


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]], align: str = "") -> str:
    """A GitHub markdown table; ``align`` holds one of ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ratio(value: float | None, base: float | None) -> str:
    """``value / base`` as ``"1.23x"``, or ``"n/a"`` when either is missing."""
    return f"{value / base:.2f}x" if value is not None and base else "n/a"


def run_worker(module: str, argv: list[str], root: Path) -> dict:
    """Runs ``python -m module *argv --worker-out FILE`` in a fresh process; returns the JSON it wrote to FILE.

    The child runs offline (``HF_HUB_OFFLINE=1``) from ``root``, with ``root`` on ``PYTHONPATH``.

    Raises:
        RuntimeError: the worker failed (the end of its stderr is in the message).
    """
    fd, out_path = tempfile.mkstemp(suffix=".json", prefix="bench_worker_")
    os.close(fd)
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", module, *argv, "--worker-out", out_path]
    try:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"worker {' '.join(argv)} failed:\n{proc.stderr[-6000:]}")
        return json.loads(Path(out_path).read_text())
    finally:
        Path(out_path).unlink(missing_ok=True)
