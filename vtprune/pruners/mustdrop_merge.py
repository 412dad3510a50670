"""MustDrop's vision-encoding stage (Liu et al., 2024): spatially adjacent similar tokens merged in
the tower's first block; ``mustdrop`` (its prefill and decode stages) will build on it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.ops.bipartite import Matching
from vtprune.ops.windows import window_matching, window_positions
from vtprune.pruners.base import TowerPruner
from vtprune.registry import register

DEFAULT_THRESHOLD = 0.8  # the reference code's


def square_grid(patches: int) -> tuple[int, int]:
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"window merging needs the patches on a square grid; {patches} patches are not")
    return side, side


@register
@dataclass
class MustDropMerge(TowerPruner):
    """After the output of block ``layers[0]`` (default: the first, as in the paper), the patch grid is
    cut into ``window x window`` windows (default 3 x 3; rows and columns beyond the last whole window
    are never merged); a window's score is the mean cosine similarity of its tokens' hidden states over
    pairs of distinct tokens, and the highest-scoring windows each become one token, the mean of its
    patches, standing where its bottom-right patch stood (``vtprune.ops.window_matching``). No
    proportional attention (the reference code has none).

    Give ``keep`` (patch tokens leaving the tower, int or fraction: the best windows merge until that
    many remain; a window merges partly where the count asks for it) or the paper's ``threshold`` (every
    window scoring at least it merges; in a batch, each image merges as many windows as the image with
    the fewest such windows, its best ones, as the reference code does), not both. Neither: threshold
    0.8, the paper's setting. With ``keep``, batched == per image; with ``threshold``, only per image.
    """

    threshold: float | None = None
    window: int = 3

    name = "mustdrop_merge"
    paper_budget = "threshold"
    merges_after = "block"
    proportional: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.keep is None and self.threshold is None:
            self.threshold = DEFAULT_THRESHOLD
        if self.layers is None:
            self.layers = (0,)
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window must be an int >= 2 (the side of a square window), got {self.window!r}")
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(
                f"layers must name one block (windows need the whole patch grid, which one merge breaks), "
                f"got {list(self.layers)}"
            )

    def _check_paper_budget(self) -> None:
        threshold = self.threshold
        if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not -1 <= threshold <= 1:
            raise ValueError(f"threshold must be a number in [-1, 1] (a mean cosine), got {threshold!r}")

    @property
    def exact_plan(self) -> bool:
        return self.threshold is None

    def most_merges(self, n: int, protected: int) -> int:
        return len(window_positions(square_grid(n - protected), self.window)) * (self.window**2 - 1)

    def merge_plan(self, patches: int, protected: int, blocks: int, counted_on: int | None = None) -> list[int]:
        (block,) = self.merging_blocks(blocks)
        most = self.most_merges(patches + protected, protected)
        r = most if self.threshold is not None else patches - self.leaving(patches, counted_on)
        if r > most:
            side = math.isqrt(patches)
            raise ValueError(
                f"keep={self.keep}: {self.window}x{self.window} windows on a {side}x{side} grid leave at least "
                f"{patches - most} of {patches} patches; use a larger keep or a smaller window"
            )
        plan = [0] * blocks
        plan[block] = r
        return plan

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None) -> Matching:
        grid = square_grid(metric.shape[1] - protected)
        return window_matching(metric, r, protected, grid, self.window, self.threshold)
