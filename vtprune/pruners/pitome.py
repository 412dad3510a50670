"""PiToMe (Tran et al., NeurIPS 2024): merge inside the tower where the energy says tokens are redundant."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from vtprune.ops.bipartite import Matching
from vtprune.ops.energy import energy_matching
from vtprune.pruners.base import TowerPruner
from vtprune.registry import register


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

    ratio: float | None = None
    margin: float = 0.9
    proportional: bool = False

    name = "pitome"
    paper_budget = "ratio"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.margin, bool) or not isinstance(self.margin, numbers.Real) or not -1 <= self.margin <= 1:
            raise ValueError(f"margin must be a number in [-1, 1] (a cosine), got {self.margin!r}")

    def _check_paper_budget(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, numbers.Real) or not 0.5 <= self.ratio <= 1:
            raise ValueError(f"ratio must be a float in [0.5, 1] (tokens each block keeps), got {self.ratio!r}")

    def paper_merges(self, present: int) -> int:
        return math.floor(present - present * self.ratio)

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None) -> Matching:
        mode = "pitome_bsm" if layer < math.ceil(layers / 2) else "pitome"
        return energy_matching(metric, r, protected, self.margin * (1 - layer / layers), mode)
