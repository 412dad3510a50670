"""MustDrop's decoding stage (Liu et al., 2024): the output-aware KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.pruners.base import DecodePruner, HeldTokens, ModelInfo


@dataclass
class MustDropCache(DecodePruner):
    """After the prefill, each decoder layer from ``layer`` on holds only the visual tokens that reached
    the last decoder layer; the layers before it keep what entered them. ``layer`` None (the paper's
    setting): each image's first LLM-stage drop layer, so the layers that ran on all of an image's
    tokens keep them, and every later layer holds the image's final tokens alone (in the reference
    code, layers 2 to 14 lose the tokens its drops at layers 6, 10 and 14 remove).

    After a multi-drop LLM-stage pruner (``pdrop``, ``transprune``, ``adaptive``, ``mustdrop``'s own
    filter) this shrinks the cache of the layers between the drops; after a single drop it changes
    nothing. The entries leave at the first decode step and nothing is removed later (the reference
    code's policy). The reference code gives generated tokens, in the shortened layers, positions
    counted from that layer's cache length; here every token keeps its position.
    ``keep`` is not used.
    """

    layer: int | None = None

    name: ClassVar[str] = "mustdrop.cache"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(
                f"layer must be an int (the first decoder layer holding only the final visual tokens) or None, "
                f"got {self.layer!r}"
            )

    def check(self, info: ModelInfo) -> None:
        n = info.num_decoder_layers
        if self.layer is not None and not 1 <= self.layer < n:
            raise ValueError(
                f"layer must be an int in [1, {n - 1}] for this {n}-layer decoder (layer 0 always holds the "
                f"whole prompt), got {self.layer}"
            )

    def first_layer(self, info: ModelInfo) -> int:
        return self.layer if self.layer is not None else 1

    def hold(self, tokens: HeldTokens) -> torch.Tensor:
        start = self.layer if self.layer is not None else tokens.first_drop
        if start is None or tokens.layer < start:
            return torch.arange(len(tokens), device=tokens.positions.device)
        return tokens.final.nonzero().flatten()
