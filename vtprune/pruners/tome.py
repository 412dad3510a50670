"""ToMe (Bolya et al., ICLR 2023): merge similar tokens inside the tower by bipartite soft matching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.ops.bipartite import Matching, bipartite_matching
from vtprune.pruners.base import TowerPruner
from vtprune.registry import register


@register
@dataclass
class ToMe(TowerPruner):
    """Token Merging: in each merging block, after attention, the tokens at even positions are linked to
    their most similar token at an odd position (cosine of the keys averaged over heads) and the ``r``
    best-linked ones merge into their partners as size-weighted means; later attention adds
    ``log(size)`` to the logits (proportional attention), as in the paper.

    Give ``keep`` (patch tokens leaving the tower, int or fraction; default 64) or the paper's ``r``
    (tokens merged per block, in every block of ``layers``; capped at half the tokens a block holds),
    not both. ``proportional=False`` drops the attention correction (the paper's ablation).
    """

    r: int | None = None
    proportional: bool = True

    name = "tome"
    paper_budget = "r"

    def _check_paper_budget(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
            raise ValueError(f"r must be an int >= 0 (tokens merged per block), got {self.r!r}")

    def paper_merges(self, present: int) -> int:
        return self.r

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None) -> Matching:
        return bipartite_matching(metric, r, protected)
