"""AIM (Zhong et al., ICCV 2025): adaptive inference of multi-modal LLMs by merging visual tokens
before the language model and pruning them progressively inside it."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.core.schedule import DropPoint, budget_tokens, mean_tokens
from vtprune.ops.bipartite import Matching, bipartite_matching
from vtprune.pruners.base import ModelInfo, PromptTokens, ScheduledPruner, TowerPruner, leaving_at_least
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import register

# The reference code on LLaVA-1.5: 576 patches merged to 252; inside the 32-layer decoder every token
# through layer 13, then 1/8 fewer of them per layer, none from layer 21 on.
MERGE = 252 / 576
START, STOP = 13 / 32, 21 / 32


def linear_points(n_tokens: int, num_layers: int, start: float, stop: float) -> list[DropPoint]:
    """AIM's piecewise-linear schedule: decoder layer ``j`` holds ``floor(n * (stop - j) / (stop - start))``
    of the ``n_tokens`` visual tokens, clamped to [0, n] (``start`` and ``stop`` in layers, real numbers:
    every token up to ``start``, none from ``stop`` on); layer 0 holds all of them."""
    points, previous = [], n_tokens
    for layer in range(1, num_layers):
        share = 1.0 if layer <= start else max(0.0, (stop - layer) / (stop - start))
        count = min(previous, math.floor(n_tokens * share))
        if count < previous:
            points.append(DropPoint(layer, count))
            previous = count
    return points


def _fraction(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1] (a fraction of the decoder's depth), got {value!r}")
    return float(value)


@dataclass
class AIMMerge(TowerPruner):
    """AIM's merge: after the last tower block whose output the VLM reads (LLaVA-1.5: CLIP's layer 22
    of 24), ToMe's bipartite matching (even patches into their most similar odd ones, by the cosine of
    the keys the next block's attention computes from them, all heads; of the hidden states when that
    block is the tower's last) runs as many times in a row as ``keep`` asks (576 -> 288 -> 252 on
    LLaVA-1.5), each merged token the plain mean of itself and the tokens merged into it (no size
    weights, no proportional attention, as the reference). ``keep``: patch tokens leaving the tower
    (default ``MERGE``, the reference's 252 of 576), never fewer than ``at_least`` (AIM's own ``keep``).

    The matchings pair the same tokens as the reference's; the merged tokens then enter the language
    model in the patches' order (each at its first patch's place), not in the reference's matching order.
    """

    at_least: int | float = 1

    name: ClassVar[str] = "aim.merge"
    default_keep: ClassVar[float] = MERGE
    merges_after: ClassVar[str] = "block"
    block_metric: ClassVar[str] = "next_keys"
    size_weighted: ClassVar[bool] = False
    proportional: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.layers is not None:
            raise ValueError("AIM merges after the last block the VLM reads: layers is not an option of 'aim.merge'")
        super().__post_init__()

    def merging_blocks(self, blocks: int) -> tuple[int, ...]:
        return (blocks - 1,)

    def leaving(self, patches: int, counted_on: int | None = None) -> int:
        return leaving_at_least(self, self.at_least, patches, counted_on)

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None) -> Matching:
        # The reference matches the patches without the CLS token: their parity, not the sequence's.
        m = bipartite_matching(metric[:, protected:], r)
        prefix = torch.arange(protected, device=metric.device).expand(metric.shape[0], protected)
        return Matching(torch.cat([prefix, m.kept + protected], dim=1), m.merged + protected, m.into + protected)


@dataclass
class AIMPrune(ScheduledPruner):
    """AIM's pruning inside the language model: after a decoder layer, each image's visual tokens are
    ranked by a PageRank over that layer's attention among all the prompt's tokens (signal ``"flow"``,
    ``vtprune.ops.causal_attention_rank``: temperature 0.1, 5 steps from a uniform start, heads' root
    mean square), and the schedule's count of them goes on; text tokens always stay.

    ``keep`` is the mean number of visual tokens per decoder layer (int, or a fraction of the tokens
    entering the language model), met by sliding AIM's linear decline (a quarter of the decoder deep,
    from all tokens to none) along the layers. Give ``start`` and ``stop`` instead (fractions of the
    decoder's depth: every token up to layer ``start * L``, none from ``stop * L`` on, a linear decline
    between) for the paper's scheduler; the reference's are 13/32 and 21/32.
    """

    keep: int | float | None = None
    start: float | None = None
    stop: float | None = None

    name: ClassVar[str] = "aim.prune"
    signals: ClassVar[tuple[str, ...]] = ("flow",)
    score_offset: ClassVar[int] = 1
    paper_options: ClassVar[str] = "start and stop (the reference's: 13/32 and 21/32)"

    def __post_init__(self) -> None:
        if self.start is None and self.stop is None:
            self.keep = 64 if self.keep is None else self.keep
            super().__post_init__()
            return
        if self.keep is not None or self.schedule is not None:
            raise ValueError(
                "give keep (visual tokens per decoder layer) or start and stop (AIM's scheduler), not both"
            )
        if self.start is None or self.stop is None:
            raise ValueError("AIM's scheduler needs both start and stop (fractions of the decoder's depth)")
        self.start, self.stop = _fraction("start", self.start), _fraction("stop", self.stop)
        if self.start >= self.stop:
            raise ValueError(f"start must come before stop, got start={self.start} and stop={self.stop}")
        self._check_budget()

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        layers = info.num_decoder_layers
        if self.schedule is not None:
            return super().drop_points(info, n_tokens)
        if self.start is not None:
            return linear_points(n_tokens, layers, self.start * layers, self.stop * layers)
        average = budget_tokens(self.keep, n_tokens)
        if average >= n_tokens:
            return []
        width = (STOP - START) * layers
        lo, hi = -width, float(layers)  # the decline's start: the mean grows with it
        for _ in range(60):
            mid = (lo + hi) / 2
            if mean_tokens(linear_points(n_tokens, layers, mid, mid + width), layers, n_tokens) < average:
                lo = mid
            else:
                hi = mid
        candidates = [linear_points(n_tokens, layers, s, s + width) for s in (lo, hi)]
        return min(candidates, key=lambda p: abs(mean_tokens(p, layers, n_tokens) - average))

    def score(self, tokens: PromptTokens) -> torch.Tensor:
        return tokens.flow


@register
@dataclass
class AIM(Pipeline):
    """AIM as one pruner: its merge after the tower (``AIMMerge``: ``merge``, the share of patches
    leaving it, default the reference's 252 of 576) and its PageRank pruning inside the language model
    (``AIMPrune``: ``keep``, the mean number of visual tokens per decoder layer, default 64; or the
    paper's ``start`` and ``stop``). ``keep=1.0`` merges and prunes nothing. Kept tokens keep their
    positions (the reference masks pruned tokens out of the keys, which is the same).
    """

    keep: int | float | None = None
    merge: float = MERGE
    start: float | None = None
    stop: float | None = None
    budget: str = field(default="per_frame", kw_only=True)
    pruners: list = field(init=False, default_factory=list)

    name: ClassVar[str] = "aim"
    stage: ClassVar[str] = "tower+llm"

    def __post_init__(self) -> None:
        m = self.merge
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 < m <= 1:
            raise ValueError(f"merge must be a fraction in (0, 1] (of the patches leaving the tower), got {m!r}")
        at_least = 1 if self.keep is None else self.keep
        prune = AIMPrune(keep=self.keep, start=self.start, stop=self.stop, budget=self.budget)
        self.pruners = [AIMMerge(keep=float(m), at_least=at_least), prune]
        super().__post_init__()

    def options(self) -> dict:
        return {"keep": self.keep, "merge": self.merge, "start": self.start, "stop": self.stop, "budget": self.budget}
