"""What the last pruned forward did, for inspection and for the benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PruneStats:
    """kept[b]: ascending indices into sample b's visual-token sequence (its images' tokens in prompt
    order) of the tokens that reached the last decoder layer.
    layer_tokens[b][l]: visual tokens of sample b entering decoder layer l."""

    kept: list[torch.Tensor]
    layer_tokens: list[list[int]]

    @property
    def kept_counts(self) -> list[int]:
        return [int(k.numel()) for k in self.kept]
