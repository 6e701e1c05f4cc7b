"""Measurement tools shared by ``rnnlab bench speed``: timing, peak memory, the machine's matmul
peak and memory bandwidth, time / memory budgets, the host load.

Everything is device-agnostic: on CUDA, timings synchronise the device around each call and peak
memory is ``torch.cuda.max_memory_allocated``; on CPU, peak memory comes from the PyTorch CPU
allocator's accounting as seen by ``torch.profiler`` (see :func:`peak_memory`).
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ..flops import matmul_peak, sync  # noqa: F401 (part of this module's interface)

__all__ = ["Timing", "Budget", "sync", "timeit", "peak_memory", "matmul_peak", "bandwidth", "load_average",
           "others_running"]


@dataclass
class Timing:
    """Median wall time of ``repeats`` calls after the warm-up calls, in seconds. ``over`` is set
    (and the rest skipped, ``seconds`` then being that call's time) when the last warm-up call
    alone took more than the time budget."""

    seconds: float
    repeats: int
    over: bool = False


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float | None = None,
           warmup: int = 1) -> Timing:
    """Time ``fn()``: ``warmup`` untimed calls, then the median of ``repeats`` calls
    (``time.perf_counter``, the device synchronised before and after each call). The last warm-up
    call slower than ``budget_s`` stops there (see :class:`Timing`); earlier ones may be slower
    (compiling, faulting in fresh memory)."""
    if repeats < 1 or warmup < 1:
        raise ValueError(f"repeats and warmup must be >= 1, got {repeats} and {warmup}")
    for _ in range(warmup):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        warm = time.perf_counter() - t0
    if budget_s is not None and warm > budget_s:
        return Timing(warm, 0, over=True)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return Timing(statistics.median(times), repeats)


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2 (the profiler's C++ start/stop log lines) for the block."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreters): nothing to silence
        yield
        return
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int:
    """Peak bytes of tensor memory that one call of ``fn()`` allocates on ``device`` beyond what
    was allocated before it (inputs, parameters and anything alive before the call excluded).

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus the bytes
    allocated before the call. CPU: the call runs under ``torch.profiler`` with
    ``profile_memory=True``; the allocator reports every allocation and free of a CPU tensor, and
    the peak is the highest running sum of those events. It counts tensor storage only (what the
    caching-free CPU allocator hands out), not the Python heap, the allocator's slack, oneDNN
    scratch buffers or thread stacks: an honest lower bound on the extra resident memory, and
    comparable between mixers. The profiler slows the call, so never time the same call; and the
    call's output on file descriptor 2 is silenced (an exception still propagates).
    """
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler's log lines, and the allocator's note on freed older tensors
        prof.start()
        try:
            fn()
        finally:
            prof.stop()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:  # freeing a tensor from before the call (old gradients) saves nothing of the call's
        live = max(0, live + e.nbytes())
        peak = max(peak, live)
    return peak


def bandwidth(device: torch.device, dtype: torch.dtype = torch.float32, nbytes: int = 256 * 2 ** 20,
              repeats: int = 5) -> float:
    """Weight-streaming bandwidth in bytes/s: the best of ``repeats`` matrix-vector products
    ``torch.mv`` with a matrix of about ``nbytes`` bytes in ``dtype`` (read once per product, as a
    decoding step reads its weights), after a warm-up call."""
    esize = torch.empty(0, dtype=dtype).element_size()
    cols = 4096
    rows = max(1, nbytes // (esize * cols))
    A = torch.randn(rows, cols, device=device).to(dtype)
    x = torch.randn(cols, device=device).to(dtype)
    torch.mv(A, x)
    best = 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        torch.mv(A, x)
        sync(device)
        best = max(best, A.numel() * esize / (time.perf_counter() - t0))
    return best


def load_average() -> float | None:
    """The 1-minute load average of the host (None where the OS has none). It decays over minutes,
    so it still counts a benchmark that has just finished: :func:`others_running` does not."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def others_running(samples: int = 20, interval: float = 0.05) -> float | None:
    """The mean number of runnable tasks other than this one over ``samples`` readings of Linux's
    ``/proc/stat`` (``procs_running``) ``interval`` seconds apart: about 0 on a quiet machine,
    about 1 per busy neighbour. None where there is no /proc/stat."""
    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat") as f:
                line = next(line for line in f if line.startswith("procs_running"))
        except (OSError, StopIteration):
            return None
        counts.append(int(line.split()[1]) - 1)  # this process, reading the file, is one of them
        if i + 1 < samples:
            time.sleep(interval)
    return sum(counts) / len(counts)


class Budget:
    """Per-key (e.g. per mixer) time and memory budgets: once a call of a key passes a budget, the
    rest of that key's calls are not run.

    ``stopped(key)`` is None while the key may run, else the reason (naming the T where the budget
    was passed); ``passed(key, T, seconds=..., nbytes=...)`` checks one measurement, records the
    stop if it is over, and returns the reason or None.
    """

    def __init__(self, seconds: float | None, gigabytes: float | None):
        for name, v in (("--budget-s", seconds), ("--budget-gb", gigabytes)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0, got {v}")
        self.seconds, self.gigabytes = seconds, gigabytes
        self._stops: dict[object, str] = {}

    def stopped(self, key) -> str | None:
        return self._stops.get(key)

    def passed(self, key, T: int, seconds: float | None = None, nbytes: int | None = None) -> str | None:
        reason = None
        if seconds is not None and self.seconds is not None and seconds > self.seconds:
            reason = f"{seconds:.3g} s > {self.seconds:g} s"
        elif nbytes is not None and self.gigabytes is not None and nbytes > self.gigabytes * 2 ** 30:
            reason = f"{nbytes / 2 ** 30:.3g} GB > {self.gigabytes:g} GB"
        if reason is not None:
            self._stops[key] = f"over budget (passed at T={T}: {reason})"
            return f"budget passed here ({reason})"
        return None
