"""Prefill timing shared by the demo and the benchmark scripts."""

from __future__ import annotations

import statistics
import time

import torch


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


def paired_median_seconds(fn_a, fn_b, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """Median wall times of ``fn_a()`` and ``fn_b()``, run alternately so both see the same machine."""
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
    return statistics.median(a), statistics.median(b)
