"""PyramidDrop (Xing et al., CVPR 2025): drop visual tokens in stages, by the last instruction token's attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.pruners.base import PromptTokens, ScheduledPruner
from vtprune.registry import register


@register
@dataclass
class PyramidDrop(ScheduledPruner):
    """Drops before the layers at 1/4, 1/2 and 3/4 of the decoder; each stage keeps ``ratio`` times the
    tokens of the stage before (the reference keeps 50%, 25%, 12.5% of all before layers 8, 16, 24 of
    32). At each drop the tokens are ranked by the head-mean attention the last prompt token gives
    them, computed with the drop layer's own queries and keys before it runs.

    ``keep`` is the mean number of visual tokens per decoder layer: the stage ratios stay ``ratio``
    apart and are scaled together to meet it (drops move earlier when the budget needs it).
    """

    ratio: float = 0.5

    name = "pdrop"
    signals = ("last",)
    score_offset = 0
    depths = (0.25, 0.5, 0.75)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio < 1:
            raise ValueError(
                f"ratio must be a float in (0, 1) (tokens kept from one stage to the next), got {self.ratio!r}"
            )

    @property
    def ratios(self) -> tuple[float, ...]:
        return tuple(self.ratio ** (j + 1) for j in range(len(self.depths)))

    def score(self, tokens: PromptTokens) -> torch.Tensor:
        return tokens.attention
