"""Zero-TPrune (Wang et al., CVPR 2024): zero-shot token pruning from the attention graph."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.ops.bipartite import Matching
from vtprune.ops.pagerank import attention_rank, importance_guided_drops
from vtprune.pruners.base import TowerPruner
from vtprune.registry import register

EDGE_BLOCKS = 3  # the first and last blocks get their own PageRank iteration counts


@register
@dataclass
class ZeroTPrune(TowerPruner):
    """In each pruning block, after attention: every token's importance is a Weighted PageRank over that
    block's attention graph (``vtprune.ops.attention_rank``: ``iterations`` steps, per head, the CLS and
    register tokens starting sqrt(N) times higher, heads whose score variance is outside
    ``variance_band`` left out, the rest combined by root mean square); then the less important half of
    the patch tokens is compared with the more important half (cosine of the keys averaged over heads)
    and the ``r`` tokens most similar to one there are dropped (``vtprune.ops.importance_guided_drops``).
    Dropped tokens are gone: nothing is merged, so no proportional attention follows.

    Give ``keep`` (patch tokens leaving the tower, int or fraction; default 64) or the paper's ``r``
    (tokens dropped per block, at most half of those present), not both. ``iterations``: PageRank
    steps in the first three blocks, the middle ones and the last three. In a VLM, dropped patches
    enter the language model as no token (families that resample the tower's grid refuse it).
    """

    r: int | None = None
    iterations: tuple[int, int, int] = (30, 5, 1)
    variance_band: tuple[float, float] | None = (0.01, 0.7)

    name = "zerotprune"
    paper_budget = "r"
    reads_attention = True
    drops = True
    proportional: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        steps = self.iterations
        if (
            not isinstance(steps, (list, tuple))
            or len(steps) != 3
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 1 for i in steps)
        ):
            raise ValueError(f"iterations must be three ints >= 1 (first 3 blocks, middle, last 3), got {steps!r}")
        self.iterations = tuple(steps)
        band = self.variance_band
        if band is not None and (
            not isinstance(band, (list, tuple))
            or len(band) != 2
            or any(isinstance(v, bool) or not isinstance(v, numbers.Real) for v in band)
            or not 0 <= band[0] <= band[1]
        ):
            raise ValueError(f"variance_band must be (low, high) with 0 <= low <= high, or None; got {band!r}")
        self.variance_band = None if band is None else tuple(float(v) for v in band)

    def _check_paper_budget(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be an int >= 0 (tokens dropped per block), got {self.r!r}")

    def paper_merges(self, present: int) -> int:
        return self.r

    def iterations_at(self, layer: int, layers: int) -> int:
        first, middle, last = self.iterations
        return first if layer < EDGE_BLOCKS else last if layer >= layers - EDGE_BLOCKS else middle

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None) -> Matching:
        if attention is None:
            raise RuntimeError("zerotprune needs the block's attention probabilities; the adapter gave none")
        importance = attention_rank(attention, self.iterations_at(layer, layers), protected, self.variance_band)
        return importance_guided_drops(metric, importance, r, protected)
