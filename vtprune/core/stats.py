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
    merged[b]: for merging pruners (vision stage; tower stage: the patches merged inside the tower; LLM
    stage: the tokens behind each recycled token, its anchor first), per merged token of sample b the
    indices (like ``kept``) of the tokens behind it; with ``kept``, they account for every visual token
    that reaches the last decoder layer.
    decode_tokens[b][s][l]: with a cache policy (the decode stage), the visual entries decoder layer
    l's KV cache held in sample (beam) b at decode step s, after the policy's choice; one step per
    forward that continued the cache."""

    kept: list[torch.Tensor]
    layer_tokens: list[list[int]]
    drops: list[tuple[int, list[torch.Tensor]]] = field(default_factory=list)
    merged: list[list[torch.Tensor]] = field(default_factory=list)
    decode_tokens: list[list[list[int]]] = field(default_factory=list)

    @classmethod
    def all_kept(cls, counts: list[int], layers: int) -> PruneStats:
        """Nothing pruned: ``counts[b]`` visual tokens of sample b in every one of ``layers`` layers."""
        return cls(kept=[torch.arange(n) for n in counts], layer_tokens=[[n] * layers for n in counts])

    @property
    def kept_counts(self) -> list[int]:
        """Per sample, the original visual tokens that reach the last decoder layer as they are."""
        return [int(k.numel()) for k in self.kept]

    @property
    def token_counts(self) -> list[int]:
        """Per sample, the visual tokens that reach the last decoder layer: kept ones and merged ones."""
        merged = self.merged or [[] for _ in self.kept]
        return [int(k.numel()) + len(m) for k, m in zip(self.kept, merged)]

    def entering(self) -> list[torch.Tensor]:
        """Per sample, the tokens that enter the language model in prompt order, each named by its
        first original token (a merged token by its group's first index)."""
        merged = self.merged or [[] for _ in self.kept]
        return [torch.cat([k, *[g[:1] for g in m]]).sort().values for k, m in zip(self.kept, merged)]

    def followed_by(self, llm: PruneStats) -> PruneStats:
        """These (a vision stage's) stats followed by an LLM stage's, which indexes the tokens that
        entered the LLM: the combined stats index the original visual tokens (``drops`` name a merged
        token by its first index), and the vision stage's choice is the first drop, before layer 0."""
        entered = self.entering()
        merged = self.merged or [[] for _ in self.kept]
        behind = [{int(g[0]): g for g in m} for m in merged]
        kept, still_merged = [], []
        for tokens, groups, survivors in zip(entered, behind, llm.kept):
            firsts = tokens[survivors]
            alone = [int(t) for t in firsts if int(t) not in groups]
            kept.append(torch.tensor(alone, dtype=torch.long))
            still_merged.append([groups[int(t)] for t in firsts if int(t) in groups])
        for b, recycled in enumerate(llm.merged):  # LLM-stage recycled tokens, named like its drops
            for g in recycled:
                firsts = entered[b][g]
                still_merged[b].append(torch.cat([behind[b].get(int(t), t[None]) for t in firsts]))
        return PruneStats(
            kept=kept,
            layer_tokens=llm.layer_tokens,
            drops=[(0, entered)] + [(layer, [e[k] for e, k in zip(entered, ks)]) for layer, ks in llm.drops],
            merged=still_merged if any(still_merged) else [],
        )
