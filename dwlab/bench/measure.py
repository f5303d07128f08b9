"""Timing and memory primitives: medians of interleaved repetitions, peak memory, the machine.

Every figure is the median of ``reps`` repetitions after ``warmup`` unmeasured ones. Candidates
compared with each other run round-robin (one repetition of each in turn), so that a slow
phase of the machine hits them all alike.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_medians(
    fns: dict[str, Callable[[], Any]], *, reps: int, warmup: int, device: torch.device
) -> dict[str, float]:
    """Median seconds per call of each function, run round-robin."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_extra_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Memory ``fn`` needs beyond what is allocated when it starts, at its peak.

    CUDA: ``torch.cuda.max_memory_allocated`` above the allocation at the start. CPU: the peak
    resident set size (``VmHWM``, reset to the current RSS first) above the RSS at the start.
    Memory the allocator kept from earlier work is reused without showing, so call it in a
    fresh process (``in_fresh_process``). Where the peak cannot be reset (not Linux), the
    process's lifetime peak ``ru_maxrss`` is used: an upper bound.
    """
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    if _reset_peak_rss():
        before = _proc_status_bytes("VmRSS") or 0
        fn()
        return max(0, (_proc_status_bytes("VmHWM") or 0) - before)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak - before) * (1 if sys.platform == "darwin" else 1024)


def in_fresh_process(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in a new (spawned) Python process; ``fn`` must be a module-level function."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def busy_load() -> float | None:
    """The 1-minute load average: the work other processes keep this machine busy with (None where
    the OS does not say). In a CPU-limited container it is the host's, other tenants included."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # no getloadavg (Windows), or no figure to read
        return None


def machine_info(device: torch.device, load: float | None) -> dict[str, str]:
    """What the figures were measured on; ``load``: ``busy_load()`` before the first figure."""
    import torchvision

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "CPU": cpu,
        "cores": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "device": device.type,
        "load (1 min) at start": "n/a" if load is None else f"{load:.2f}",
    }
    if device.type == "cuda":
        info["GPU"] = torch.cuda.get_device_name(device)
        info["CUDA"] = str(torch.version.cuda)
    return info
