"""PiToMe (Tran et al., NeurIPS 2024): merge inside the tower where the energy says tokens are redundant."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from vtprune.ops.bipartite import Matching, max_merges
from vtprune.ops.energy import energy_matching
from vtprune.pruners.base import TowerPruner
from vtprune.registry import register

DEFAULT_KEEP = 64


@register
@dataclass
class PiToMe(TowerPruner):
    """Spectrum-preserving token merging: in each merging block, after attention, every token gets an
    energy score, the mean over all tokens of ``ELU(cos - margin)`` (cosine of the keys averaged over
    heads); high-energy tokens (large clusters of similar ones) merge as size-weighted means, small
    isolated ones are kept. As the reference code does for ViTs: blocks in the first half of the tower
    pair by ToMe's bipartite matching over the tokens sorted by energy (``pitome_bsm``), later blocks
    merge among the ``2r`` highest-energy tokens only (``pitome``); the margin falls linearly with depth,
    ``margin * (1 - layer / layers)``.

    Give ``keep`` (patch tokens leaving the tower, int or fraction; default 64) or the paper's ``ratio``
    (the fraction of its tokens each merging block keeps, e.g. 0.925), not both. ``margin``: the first
    block's (0.9, the reference code's LLaVA setting; its DeiT setting is 0.75). ``proportional``: add
    ``log(size)`` to later attention logits (off, as in the reference code).
    """

    keep: int | float | None = None
    ratio: float | None = None
    margin: float = 0.9
    proportional: bool = False

    name = "pitome"

    def __post_init__(self) -> None:
        if self.ratio is None:
            self.keep = DEFAULT_KEEP if self.keep is None else self.keep
            super().__post_init__()
        else:
            if self.keep is not None:
                raise ValueError("give keep (patch tokens leaving the tower) or ratio (kept per block), not both")
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0.5 <= self.ratio <= 1:
                raise ValueError(f"ratio must be a float in [0.5, 1] (tokens each block keeps), got {self.ratio!r}")
            self._check_budget()
            self._check_layers()
        if isinstance(self.margin, bool) or not isinstance(self.margin, numbers.Real) or not -1 <= self.margin <= 1:
            raise ValueError(f"margin must be a number in [-1, 1] (a cosine), got {self.margin!r}")
        if not isinstance(self.proportional, bool):
            raise ValueError(f"proportional must be True or False, got {self.proportional!r}")

    def keep_count(self, n: int) -> int:
        return n if self.ratio is not None else super().keep_count(n)

    def merge_plan(self, patches: int, protected: int, blocks: int) -> list[int]:
        if self.ratio is None:
            return super().merge_plan(patches, protected, blocks)
        merging, plan, present = set(self.merging_blocks(blocks)), [], patches
        for block in range(blocks):
            r = math.floor(present - present * self.ratio) if block in merging else 0
            r = min(r, max_merges(present + protected, protected))
            plan.append(r)
            present -= r
        return plan

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int) -> Matching:
        mode = "pitome_bsm" if layer < math.ceil(layers / 2) else "pitome"
        return energy_matching(metric, r, protected, self.margin * (1 - layer / layers), mode)
