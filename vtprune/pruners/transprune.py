"""TransPrune (Li et al., 2025): rank visual tokens by how much the layers transform them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.schedule import DropPoint
from vtprune.pruners.base import ModelInfo, PromptTokens, ScheduledPruner
from vtprune.registry import register

EPS = 1e-8


@register
@dataclass
class TransPrune(ScheduledPruner):
    """Score = ``alpha`` * TTV / sum(TTV) + (1 - ``alpha``) * IGA / sum(IGA) over an image's tokens.

    TTV (token transition variation) sums, over the attention and MLP sub-layers of every layer from
    the one before the first drop up to the drop point, ``|out| / |in|`` times a softmax over tokens
    of ``1 - cos(in, out)`` (``ops.transition_variation``). IGA (instruction-guided attention) is the
    head- and token-mean attention the instruction tokens (the text after the last image) give each
    visual token, with the drop layer's own queries and keys. ``use_iga=False`` ranks by TTV alone.

    Progressive schedule of the reference (32 layers): drops before layers 7, 9 and 12 keeping 87.5%,
    62.5% and 12.5% of the tokens, scaled by depth for other models; ``keep`` is the mean number of
    visual tokens per decoder layer, met by scaling the kept ratios together.
    """

    alpha: float = 0.5
    use_iga: bool = True

    name = "transprune"
    score_offset = 0
    depths = (7 / 32, 9 / 32, 12 / 32)
    ratios = (0.875, 0.625, 0.125)

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be a float in [0, 1] (the weight of TTV against IGA), got {self.alpha!r}")
        if not isinstance(self.use_iga, bool):
            raise TypeError(f"use_iga must be True or False, got {self.use_iga!r}")

    @property
    def signals(self) -> tuple[str, ...]:
        return ("transition", "instruction") if self.use_iga else ("transition",)

    def transition_layers(self, info: ModelInfo, points: list[DropPoint]) -> range:
        return range(max(0, points[0].layer - 1), points[-1].layer) if points else range(0)

    def score(self, tokens: PromptTokens) -> torch.Tensor:
        ttv = tokens.transition.float()
        ttv = ttv / (ttv.sum() + EPS)
        if not self.use_iga:
            return ttv
        iga = tokens.instruction_attention.float()
        return self.alpha * ttv + (1 - self.alpha) * iga / (iga.sum() + EPS)
