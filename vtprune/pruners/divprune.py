"""DivPrune (Alvar et al., CVPR 2025): keep the most mutually diverse projected visual tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.ops import check_backend, max_min_diversity
from vtprune.pruners.base import VisionPruner, VisionTokens
from vtprune.registry import register


@register
@dataclass
class DivPrune(VisionPruner):
    """Greedy Max-Min Diversity over the cosine distance between projected visual tokens.

    First the token whose nearest neighbour is farthest, then repeatedly the token farthest from
    everything chosen so far. Kept tokens are returned in their original order.
    """

    backend: str = "auto"

    name = "divprune"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_backend(self.backend)

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        k = tokens.keep
        return max_min_diversity(tokens.features, k, backend=self.backend).sort().values
