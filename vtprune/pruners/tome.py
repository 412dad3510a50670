"""ToMe (Bolya et al., ICLR 2023): merge similar tokens inside the tower by bipartite soft matching."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.ops.bipartite import Matching, bipartite_matching, max_merges
from vtprune.pruners.base import TowerPruner
from vtprune.registry import register

DEFAULT_KEEP = 64


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

    keep: int | float | None = None
    r: int | None = None
    proportional: bool = True

    name = "tome"

    def __post_init__(self) -> None:
        if self.r is None:
            self.keep = DEFAULT_KEEP if self.keep is None else self.keep
            super().__post_init__()
        else:
            if self.keep is not None:
                raise ValueError("give keep (patch tokens leaving the tower) or r (tokens merged per block), not both")
            if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 0:
                raise ValueError(f"r must be an int >= 0 (tokens merged per block), got {self.r!r}")
            self._check_budget()
            self._check_layers()
        if not isinstance(self.proportional, bool):
            raise ValueError(f"proportional must be True or False, got {self.proportional!r}")

    def keep_count(self, n: int) -> int:
        return n if self.r is not None else super().keep_count(n)

    def merge_plan(self, patches: int, protected: int, blocks: int) -> list[int]:
        if self.r is None:
            return super().merge_plan(patches, protected, blocks)
        merging, plan, present = set(self.merging_blocks(blocks)), [], patches
        for block in range(blocks):
            r = min(self.r, max_merges(present + protected, protected)) if block in merging else 0
            plan.append(r)  # ToMe's cap: one matching, at most half the tokens present
            present -= r
        return plan

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int) -> Matching:
        return bipartite_matching(metric, r, protected)
