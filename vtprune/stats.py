"""What the last pruned forward did, for inspection and for the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class PruneStats:
    """kept[b]: ascending indices into sample b's visual-token sequence (its images' tokens in prompt
    order) of the tokens that reached the last decoder layer.
    layer_tokens[b][l]: visual tokens of sample b entering decoder layer l.
    drops: for LLM-stage pruners, one ``(layer, kept)`` per drop point: the tokens (indexed like
    ``kept``) that enter ``layer`` and the layers after it, until the next drop point."""

    kept: list[torch.Tensor]
    layer_tokens: list[list[int]]
    drops: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)

    @property
    def kept_counts(self) -> list[int]:
        return [int(k.numel()) for k in self.kept]
