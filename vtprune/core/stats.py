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
    ``kept``) that enter ``layer`` and the layers after it, until the next drop point; in a Pipeline
    the vision stage's choice is the first, at layer 0.
    merged[b]: for merging vision-stage pruners, per merged token of sample b the indices (like
    ``kept``) of the tokens averaged into it; with ``kept``, they account for every visual token."""

    kept: list[torch.Tensor]
    layer_tokens: list[list[int]]
    drops: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)
    merged: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def kept_counts(self) -> list[int]:
        """Per sample, the original visual tokens that reach the last decoder layer as they are."""
        return [int(k.numel()) for k in self.kept]

    @property
    def token_counts(self) -> list[int]:
        """Per sample, the visual tokens that reach the last decoder layer: kept ones and merged ones."""
        merged = self.merged or [[] for _ in self.kept]
        return [int(k.numel()) + len(m) for k, m in zip(self.kept, merged)]

    def followed_by(self, llm: PruneStats) -> PruneStats:
        """These (a vision stage's) stats followed by an LLM stage's, which indexes the tokens that
        entered the LLM: the combined stats index the original visual tokens, and the vision stage's
        choice is the first drop, before layer 0."""
        return PruneStats(
            kept=[v[k] for v, k in zip(self.kept, llm.kept)],
            layer_tokens=llm.layer_tokens,
            drops=[(0, self.kept)] + [(layer, [v[k] for v, k in zip(self.kept, kept)]) for layer, kept in llm.drops],
        )
