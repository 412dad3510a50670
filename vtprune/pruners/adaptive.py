"""Instance- and layer-adaptive pruning (the idea of ATP-LLaVA, Ye et al. 2025, without its trained module)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from vtprune.ops import farthest_points, mass_spread
from vtprune.pruners.base import PromptTokens, ScheduledPruner, top_k_sorted
from vtprune.registry import register


@register
@dataclass
class AdaptivePrune(ScheduledPruner):
    """At every drop point each image keeps a share of the schedule's count (its *cap*) that follows
    how widely the instruction tokens' attention (head- and token-mean, the drop layer's own queries and
    keys) spreads over its tokens: ``needed``, the fewest tokens holding ``mass`` of that attention, over
    the ``ceil(mass * n)`` that spread-out attention over its ``n`` tokens would need, times the cap;
    within ``[min_keep, cap]`` (and ``max_keep`` when given). Samples of one batch and the drop points of
    one sample keep different counts, each from its own attention, and no batch-mate changes them.

    Before the count, each token's attention is clipped to ``outlier`` times the median over the image
    (None: not clipped), so one attention sink cannot make every image look focused; the ranking uses
    the attention as it is. ``spatial`` in [0, 1): that fraction of each image's count is filled with
    the tokens farthest on the patch grid from the ones attention chose (along the token order when the
    tokens form no grid), so kept tokens do not all cluster.

    The caps follow PyramidDrop's shape (drops at 1/4, 1/2, 3/4 of the decoder, each stage keeping half
    of the one before), scaled so that their per-layer mean is ``keep``; ``keep`` is therefore a
    ceiling: the real mean (``handle.last.layer_tokens``) is below it, by how focused the attention is.
    ``schedule="paper"`` runs PyramidDrop's own caps (50%, 25%, 12.5% from 1/4, 1/2, 3/4 of the depth).
    """

    mass: float = 0.9
    min_keep: int = 1
    max_keep: int | None = None
    spatial: float = 0.0
    outlier: float | None = 10.0

    name = "adaptive"
    signals = ("instruction",)
    score_offset = 0
    always_selects = True  # the rule may keep fewer than a cap that holds every token
    depths = (0.25, 0.5, 0.75)
    ratios = (0.5, 0.25, 0.125)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.mass, bool) or not isinstance(self.mass, numbers.Real) or not 0 < self.mass <= 1:
            raise ValueError(f"mass must be in (0, 1] (the share of attention the kept tokens hold), got {self.mass!r}")
        if isinstance(self.min_keep, bool) or not isinstance(self.min_keep, numbers.Integral) or self.min_keep < 1:
            raise ValueError(f"min_keep must be an int >= 1, got {self.min_keep!r}")
        if self.max_keep is not None and (
            isinstance(self.max_keep, bool)
            or not isinstance(self.max_keep, numbers.Integral)
            or self.max_keep < self.min_keep
        ):
            raise ValueError(f"max_keep must be None or an int >= min_keep ({self.min_keep}), got {self.max_keep!r}")
        if isinstance(self.spatial, bool) or not isinstance(self.spatial, numbers.Real) or not 0 <= self.spatial < 1:
            raise ValueError(
                f"spatial must be in [0, 1) (the share of tokens spread over the grid), got {self.spatial!r}"
            )
        if self.outlier is not None and (
            isinstance(self.outlier, bool) or not isinstance(self.outlier, numbers.Real) or not self.outlier >= 1
        ):
            raise ValueError(
                f"outlier must be None or a number >= 1 (attention clipped to that many medians), got {self.outlier!r}"
            )

    def count(self, attention: torch.Tensor, cap: int) -> int:
        """Tokens to keep of the ``(n,)`` ``attention``: ``cap`` times the share of ``ceil(mass * n)``
        that the fewest tokens holding ``mass`` of the clipped attention make up, within
        ``[min_keep, min(cap, max_keep, n)]``."""
        n = attention.numel()
        spread = mass_spread(attention, self.mass, self.outlier)
        high = min(cap, n, self.max_keep) if self.max_keep is not None else min(cap, n)
        return max(min(round(cap * spread), high), min(self.min_keep, high))

    def select(self, tokens: PromptTokens) -> torch.Tensor:
        attention = tokens.instruction_attention
        k = self.count(attention, tokens.keep)
        spread = round(self.spatial * k) if k > 1 else 0
        chosen = top_k_sorted(attention, k - spread)
        if spread:
            taken = torch.zeros(attention.numel(), dtype=torch.bool, device=attention.device)
            taken[chosen] = True
            extra = farthest_points(self._coords(tokens), taken, spread)
            chosen = torch.cat([chosen, extra]).sort().values
        return chosen

    @staticmethod
    def _coords(tokens: PromptTokens) -> torch.Tensor:
        positions = tokens.positions.float()
        if tokens.grid is None:
            return positions[:, None]
        cols = tokens.grid[1]
        return torch.stack([torch.div(positions, cols, rounding_mode="floor"), positions % cols], dim=1)
