"""Wall time and peak memory measurement shared by the demo, the benchmark scripts and the tests."""

from __future__ import annotations

import ctypes
import functools
import statistics
import time
from dataclasses import dataclass

import torch


def runs_phrase(repeats: int) -> str:
    """How a timing table names its statistic: "one run" or "medians of N runs"."""
    return "one run" if repeats == 1 else f"medians of {repeats} runs"


def count_phrase(n: int, noun: str) -> str:
    """``n`` and ``noun``, plural unless ``n`` is 1: "1 thread", "2 threads"."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def median_seconds(fn, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` under ``torch.no_grad``."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def paired_seconds(fn_a, fn_b, repeats: int = 5, warmup: int = 1) -> tuple[list[float], list[float]]:
    """Wall times of ``fn_a()`` and ``fn_b()``, run alternately so both see the same machine: run i
    of one is paired with run i of the other."""
    with torch.no_grad():
        for _ in range(warmup):
            fn_a()
            fn_b()
        a, b = [], []
        for _ in range(repeats):
            for fn, times in ((fn_a, a), (fn_b, b)):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
    return a, b


def paired_median_seconds(fn_a, fn_b, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn_a()`` and ``fn_b()``, run alternately (:func:`paired_seconds`)."""
    a, b = paired_seconds(fn_a, fn_b, repeats=repeats, warmup=warmup)
    return statistics.median(a), statistics.median(b)


@dataclass(frozen=True)
class Spread:
    """The median and the interquartile range (``low`` to ``high``) of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values) -> Spread:
        values = sorted(values)
        if not values:
            raise ValueError("no measurements")
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        low, median, high = statistics.quantiles(values, n=4, method="inclusive")
        return cls(median, low, high)

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


def speedup(slow: list[float], fast: list[float]) -> Spread:
    """The speed-up of ``fast`` over ``slow`` from paired runs (:func:`paired_seconds`): the median and
    interquartile range of the per-pair ratios, so a range that holds 1.0 is no speed-up at all."""
    if len(slow) != len(fast):
        raise ValueError(f"paired runs needed, got {len(slow)} and {len(fast)} times")
    return Spread.of(s / f for s, f in zip(slow, fast))


class ForwardClock:
    """``perf_counter()`` at the end of every forward of ``model`` since ``start()`` (CUDA-synchronised
    on GPUs): in ``generate()``, the first end is the prefill's, the later ones the decode steps'."""

    def __init__(self, model):
        self._device = next(model.parameters()).device
        self._handle = model.register_forward_hook(lambda *_: self.ends.append(self.now()))
        self.started: float | None = None
        self.ends: list[float] = []

    def now(self) -> float:
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)
        return time.perf_counter()

    def start(self) -> None:
        self.ends = []
        self.started = self.now()

    @property
    def first_seconds(self) -> float:
        """From ``start()`` to the end of the first forward after it."""
        if self.started is None or not self.ends:
            raise RuntimeError("no forward has ended since start()")
        return self.ends[0] - self.started

    def close(self) -> None:
        self._handle.remove()


_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise RuntimeError(f"/proc/self/status has no {field}")


@functools.cache
def _return_freed_memory_to_the_os() -> None:
    # glibc keeps freed blocks of up to 32 MiB resident for reuse, and a later allocation served from
    # them never shows in the peak RSS. Serving every block >= 64 KiB by mmap makes RSS follow the
    # live allocations (setting the threshold also switches off glibc's adaptive threshold).
    try:
        ctypes.CDLL("libc.so.6").mallopt(_M_MMAP_THRESHOLD, 1 << 16)
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    # Blocks freed before the threshold was set stay resident in the heap and would serve later
    # allocations unseen; malloc_trim hands the free ones back to the OS.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory_available() -> bool:
    """Whether :func:`peak_memory_growth` can measure here (Linux lets a process reset its peak RSS)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


def peak_memory_growth(fn) -> int:
    """Bytes by which the process's peak resident memory rose above its size before ``fn()`` ran.

    Counts every allocation, torch's CPU allocator included (which ``tracemalloc`` does not see).
    Linux only: writing 5 to ``/proc/self/clear_refs`` resets the peak (VmHWM) to the current size.
    """
    if not peak_memory_available():
        raise RuntimeError("peak memory measurement needs Linux's /proc/self/clear_refs")
    _return_freed_memory_to_the_os()
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak is now the current size
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before
