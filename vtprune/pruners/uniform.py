"""A spatially even subsample of the patch grid: the position-only baseline."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vtprune.pruners.base import VisionPruner, VisionTokens
from vtprune.registry import register


def _evenly_spaced(n: int, k: int) -> torch.Tensor:
    """k indices spread over range(n), each at the centre of its 1/k-th share."""
    return ((torch.arange(k, dtype=torch.float64) + 0.5) * n / k).floor().long()


def grid_subsample(rows: int, cols: int, k: int) -> torch.Tensor:
    """k raster indices of a rows x cols grid, laid out as an even sub-grid.

    The sub-grid keeps the grid's aspect ratio (8 x 8 of 24 x 24 for k = 64); when its size overshoots
    k, the surplus cells are dropped evenly along the raster order.
    """
    sub_rows = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    sub_cols = min(cols, math.ceil(k / sub_rows))
    sub_rows = min(rows, math.ceil(k / sub_cols))
    r = _evenly_spaced(rows, sub_rows)
    c = _evenly_spaced(cols, sub_cols)
    cells = (r[:, None] * cols + c[None, :]).flatten()
    return cells[_evenly_spaced(cells.numel(), k)] if cells.numel() > k else cells


@register
@dataclass
class UniformPrune(VisionPruner):
    """Keeps an evenly spaced sub-grid of patches (evenly spaced raster positions when the tokens do
    not form a known grid)."""

    name = "uniform"

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        n = tokens.features.shape[0]
        k = tokens.keep
        if tokens.grid is None:
            kept = _evenly_spaced(n, k)
        else:
            kept = grid_subsample(*tokens.grid, k)
        return kept.to(tokens.features.device)
