"""FastV (Chen et al., ECCV 2024): drop the visual tokens the prompt's last token ignores."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.pruners.base import LLMPruner, PromptTokens, top_k_sorted
from vtprune.registry import register


@register
@dataclass
class FastV(LLMPruner):
    """Ranks each image's tokens by the head-mean attention they receive from the last prompt token
    at decoder layer ``layer - 1`` and keeps the top ``keep`` from layer ``layer`` on.

    Pruning happens once, at prefill; dropped tokens leave the KV cache of layers >= ``layer``, and
    the tokens that stay keep their original positions.
    """

    name = "fastv"

    def select(self, tokens: PromptTokens) -> torch.Tensor:
        return top_k_sorted(tokens.attention, self.budget(tokens.attention.shape[0]))
