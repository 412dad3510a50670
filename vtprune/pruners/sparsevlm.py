"""SparseVLM (Zhang et al., ICML 2025): text-guided visual token sparsification in the LLM, with the
tokens it drops partly recycled."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.core.schedule import DropPoint, budget_tokens, fit_average, scaled_layers
from vtprune.ops import density_peak_clusters
from vtprune.pruners.base import ModelInfo, PromptTokens, Reduction, ScheduledPruner, top_k_sorted
from vtprune.registry import register

# The reference code (v1.5) scores at decoder layers 2, 6 and 15 of LLaVA-1.5's 32 and prunes their
# outputs: drops before 3, 7 and 16.
DROP_DEPTHS = (3 / 32, 7 / 32, 16 / 32)
# Its settings: the visual tokens each drop selects (recycled tokens come on top), of 576.
SETTINGS = {192: (300, 200, 110), 128: (303, 110, 36), 64: (66, 30, 17)}
RECYCLED_SHARE = 0.3  # of the dropped tokens, the best-rated are recycled...
CLUSTER_SHARE = 10  # ...into one token per ten of them (plus one)


def recycled_count(dropped: int) -> int:
    """Recycled tokens made of ``dropped`` tokens: ``int(0.3 d) + 1`` best-rated ones in groups of about
    ten (the reference's counts, float rounding included)."""
    if dropped <= 0:
        return 0
    return int((int(RECYCLED_SHARE * dropped) + 1) / CLUSTER_SHARE) + 1


def selected_count(total: int, present: int) -> int:
    """The most tokens a drop can select so that they and the tokens recycled from the rest fit
    ``total`` (0 when even recycling alone does not: then the recycled tokens shrink to ``total``)."""
    for selected in range(min(total, present), -1, -1):
        if selected + recycled_count(present - selected) <= total:
            return selected
    return 0


@register
@dataclass
class SparseVLM(ScheduledPruner):
    """At three drop points (before layers 3, 7 and 16 of 32, scaled to other depths) the visual tokens
    are ranked by the attention the *text raters* give them at the layer before (head mean, mean over
    the raters): the instruction tokens (the text after the last image) whose relevance to the
    sample's visual tokens at the decoder's input is above the mean (a softmax over the instruction of
    each visual token's dot products with them, averaged over the visual tokens). The best ones stay;
    with ``recycle``, the best-rated 30% of the others (plus one) are grouped by density-peak
    clustering of their hidden states (``ops.density_peak_clusters``, one group per ten, plus one) and
    each group becomes one recycled token, the mean of its members, standing at its best-rated member's
    place ([recycling](docs/pruners.md#recycling-in-the-llm-stage)).

    ``keep`` is the mean number of visual tokens per decoder layer (recycled ones counted), met by
    scaling the counts of the reference setting closest to it; ``retain=64``, ``128`` or ``192`` runs a
    reference setting as its v1.5 code does instead (the tokens each drop selects, recycled ones on
    top; on LLaVA-1.5 its "64" leaves 82, 32 and 18 tokens after the drops).
    """

    keep: int | float | None = None
    retain: int | None = None
    recycle: bool = True

    name: ClassVar[str] = "sparsevlm"
    signals: ClassVar[tuple[str, ...]] = ("raters", "hidden")
    score_offset: ClassVar[int] = 1
    depths: ClassVar[tuple[float, ...]] = DROP_DEPTHS
    paper_options: ClassVar[str] = "retain=64, 128 or 192"

    def __post_init__(self) -> None:
        if self.retain is not None:
            if self.keep is not None:
                raise ValueError(
                    "give keep (visual tokens per decoder layer) or retain (a reference setting), not both"
                )
            if isinstance(self.retain, bool) or self.retain not in SETTINGS:
                raise ValueError(
                    f"retain must be one of {sorted(SETTINGS)} (the reference's settings), got {self.retain!r}"
                )
            self._check_budget()
            if self.schedule is not None:
                raise ValueError("give retain (a reference setting) or schedule, not both")
        else:
            self.keep = 64 if self.keep is None else self.keep
            super().__post_init__()
        if not isinstance(self.recycle, bool):
            raise ValueError(f"recycle must be True or False, got {self.recycle!r}")

    def _with_recycled(self, selected: tuple[int, ...], n_tokens: int) -> list[int]:
        counts, present = [], n_tokens
        for s in selected:
            s = min(s, present)
            present = s + (recycled_count(present - s) if self.recycle else 0)
            counts.append(present)
        return counts

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        if self.schedule is not None:
            return super().drop_points(info, n_tokens)
        layers = scaled_layers(list(self.depths), info.num_decoder_layers)
        if self.retain is not None:
            counts = self._with_recycled(SETTINGS[self.retain][: len(layers)], n_tokens)
            return [DropPoint(layer, count) for layer, count in zip(layers, counts)]
        # The shape keep scales: the reference setting closest to it (as a share), recycled tokens counted.
        average = budget_tokens(self.keep, n_tokens)
        setting = min(SETTINGS, key=lambda s: abs(s / 576 - average / n_tokens))
        shape = [c / 576 for c in self._with_recycled(SETTINGS[setting], 576)]
        return fit_average(list(self.depths), shape, info.num_decoder_layers, n_tokens, average)

    def reduce(self, tokens: PromptTokens) -> Reduction:
        scores = tokens.rater_attention
        n = len(tokens)
        if not self.recycle:
            return Reduction(top_k_sorted(scores, tokens.keep))
        selected = top_k_sorted(scores, selected_count(tokens.keep, n))
        dropped = torch.ones(n, dtype=torch.bool, device=scores.device)
        dropped[selected] = False
        pool = dropped.nonzero().flatten()
        clusters = min(recycled_count(pool.numel()), tokens.keep - selected.numel())
        if clusters <= 0:
            return Reduction(selected)
        best = pool[torch.sort(scores[pool], descending=True, stable=True).indices]
        recycled = best[: int(RECYCLED_SHARE * pool.numel()) + 1]  # best-rated first
        assignment, _ = density_peak_clusters(tokens.hidden[recycled], clusters)
        # Each group lists its members best-rated first: the first is its anchor.
        groups = tuple(recycled[assignment == j] for j in range(clusters))
        return Reduction(selected, tuple(g for g in groups if g.numel()))
