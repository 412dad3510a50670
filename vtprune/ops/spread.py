"""How widely a score vector spreads its mass: adaptive pruning's per-sample count."""

from __future__ import annotations

import math

import torch


def mass_spread(scores: torch.Tensor, mass: float, outlier: float | None = None) -> float:
    """The fewest entries of the ``(n,)`` non-negative ``scores`` (negatives count as 0) holding
    ``mass`` of their sum, over the ``ceil(mass * n)`` that equal scores would need: in (0, 1], 1 for a
    uniform (or all-zero) vector, small when a few entries hold the mass.

    ``outlier``: each score is first clipped to that many times the median (skipped when the median is
    0), so one huge entry (an attention sink) cannot make the vector look concentrated.
    """
    n = scores.numel()
    if n == 0:
        raise ValueError("mass_spread of an empty score vector")
    share = scores.float().clamp_min(0)
    if outlier is not None:
        limit = outlier * share.median()
        if limit > 0:
            share = share.clamp_max(limit)
    total = share.sum()
    if total <= 0:
        return 1.0  # nothing to tell the entries apart: as spread out as can be
    cumulative = torch.sort(share / total, descending=True).values.cumsum(0)
    needed = int((cumulative < mass - 1e-6).sum()) + 1
    return min(1.0, needed / math.ceil(mass * n - 1e-9))  # rounding can add one token to the uniform case
