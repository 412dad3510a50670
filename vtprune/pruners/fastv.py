"""FastV (Chen et al., ECCV 2024): drop the visual tokens the prompt's last token ignores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.schedule import DropPoint
from vtprune.pruners.base import LLMPruner, ModelInfo, PromptTokens
from vtprune.registry import register


@register
@dataclass
class FastV(LLMPruner):
    """Ranks each image's tokens by the head-mean attention they receive from the last prompt token
    at decoder layer ``layer - 1`` and keeps the top ``keep`` from layer ``layer`` on.

    Pruning happens once, at prefill; dropped tokens leave the KV cache of layers >= ``layer``, and
    the tokens that stay keep their original positions.
    """

    layer: int = 2

    name = "fastv"
    score_offset = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        # The range needs the model's depth (``check``); a wrong type is refused before any model exists.
        if isinstance(self.layer, bool) or not isinstance(self.layer, int):
            raise ValueError(f"layer must be an int (a decoder layer index), got {self.layer!r}")

    def check(self, info: ModelInfo) -> None:
        n = info.num_decoder_layers
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 1 <= self.layer < n:
            raise ValueError(
                f"layer must be an int in [1, {n - 1}] for this {n}-layer decoder (tokens are scored at "
                f"layer-1 and dropped before layer), got {self.layer!r}"
            )

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        return [DropPoint(self.layer, self.keep_count(n_tokens))]

    def score(self, tokens: PromptTokens) -> torch.Tensor:
        return tokens.attention
