"""MustDrop (Liu et al., 2024): multi-stage vision token dropping over the whole lifecycle of a visual
token: merged in the tower, filtered by the instruction's attention in the prefill, and dropped from
the KV cache for decoding."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.core.schedule import DropPoint, scaled_layers
from vtprune.pruners.base import ModelInfo, PromptTokens, ScheduledPruner, leaving_at_least
from vtprune.pruners.cls import warn_without_cls
from vtprune.pruners.mustdrop_cache import MustDropCache
from vtprune.pruners.mustdrop_merge import MustDropMerge
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import register

# The reference code scores at decoder layers 2, 6, 10 and 14 of LLaVA-1.5's 32 and drops after each:
# drops before 3, 7, 11 and 15.
DROP_DEPTHS = (3 / 32, 7 / 32, 11 / 32, 15 / 32)
# The staircase of the paper's figure 2(d) example (309 tokens entering, 168 after the first drop, 64
# at the end), geometric in between: the shape ``keep`` scales.
STAIRCASE = (0.54, 0.39, 0.29, 0.21)
KEY_RATIO = 0.08  # the reference code's key set: ceil(8%) of the tokens entering the LLM


def _share(x: torch.Tensor) -> torch.Tensor:
    return x / x.sum().clamp_min(1e-12)


@dataclass
class MustDropFilter(ScheduledPruner):
    """MustDrop's prefill stage (dual-attention filtering). At each drop point a visual token is judged
    by the attention the instruction (the text after the last image) gives it at the layer before,
    head mean: its *global* share (summed over the instruction tokens, as a share of all the image's
    tokens still present) and its *individual* peak (the most any one instruction token gives it).
    The reference drops a token when its share is below ``global_threshold`` and its peak below
    ``individual_threshold``; the key set (the ``key_ratio`` share of the tokens entering the LLM
    with the highest CLS attention at the tower's last layer) always stays.

    With ``keep`` (the mean number of visual tokens per decoder layer, like ``pdrop``) the counts
    follow ``STAIRCASE`` scaled to it, and each drop keeps the key set, then the tokens that pass the
    two thresholds scaled by one factor (the score max(share / global, peak / individual)), so the
    budget holds. Give ``global_threshold`` and ``individual_threshold`` without ``keep`` for the
    paper's rule: as many tokens stay as pass (per image and prompt), at the drop layers of
    ``DROP_DEPTHS`` (before layers 3, 7, 11 and 15 of 32).
    """

    keep: int | float | None = None
    global_threshold: float | None = None
    individual_threshold: float | None = None
    key_ratio: float = KEY_RATIO

    name: ClassVar[str] = "mustdrop.filter"
    signals: ClassVar[tuple[str, ...]] = ("instruction", "instruction_peak", "tower")
    score_offset: ClassVar[int] = 1
    depths: ClassVar[tuple[float, ...]] = DROP_DEPTHS
    ratios: ClassVar[tuple[float, ...]] = STAIRCASE
    paper_options: ClassVar[str] = "global_threshold and individual_threshold (without keep)"
    # The reference's TextVQA "64" setting; with ``keep`` only their ratio matters.
    default_thresholds: ClassVar[tuple[float, float]] = (0.011, 0.01)

    def __post_init__(self) -> None:
        thresholds = (self.global_threshold, self.individual_threshold)
        if self.keep is not None and any(t is not None for t in thresholds):
            raise ValueError(
                "give keep (visual tokens per decoder layer) or global_threshold and individual_threshold "
                "(the paper's rule), not both"
            )
        if self.keep is None and any(t is None for t in thresholds):
            if all(t is None for t in thresholds):
                self.keep = 64
            else:
                raise ValueError("the paper's rule needs both global_threshold and individual_threshold")
        if self.keep is not None:
            super().__post_init__()
        else:
            self._check_budget()
            for name, value in zip(("global_threshold", "individual_threshold"), thresholds):
                if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
                    raise ValueError(f"{name} must be a number in [0, 1] (an attention share), got {value!r}")
        k = self.key_ratio
        if isinstance(k, bool) or not isinstance(k, numbers.Real) or not 0 <= k <= 1:
            raise ValueError(f"key_ratio must be a number in [0, 1] (the share of tokens protected), got {k!r}")

    @property
    def always_selects(self) -> bool:
        return self.keep is None  # the paper's rule decides its counts at every drop

    def check(self, info: ModelInfo) -> None:
        super().check(info)
        warn_without_cls(info, "mustdrop")

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        return [info.num_tower_layers - 1]

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        if self.keep is not None:
            return super().drop_points(info, n_tokens)
        return [DropPoint(layer, n_tokens) for layer in scaled_layers(list(self.depths), info.num_decoder_layers)]

    def select(self, tokens: PromptTokens) -> torch.Tensor:
        n = len(tokens)
        share, peak = _share(tokens.instruction_attention.float()), tokens.instruction_peak.float()
        key = self.key_set(tokens)
        if self.keep is None:
            passing = (share >= self.global_threshold) | (peak >= self.individual_threshold)
            return (passing | key).nonzero().flatten()
        g, i = self.default_thresholds
        score = torch.maximum(share / g, peak / i)
        # Keys first (by the tower's attention), then the rest by how far their thresholds could rise.
        tower = tokens.tower_attention.float()
        rank = torch.where(key, 2.0 + _share(tower), score / score.max().clamp_min(1e-12))
        k = min(tokens.keep, n)
        return torch.sort(torch.topk(rank, k, sorted=True).indices).values

    def key_set(self, tokens: PromptTokens) -> torch.Tensor:
        """(N,) bool: the key set among the tokens present: those of the image's ``ceil(key_ratio * N0)``
        highest tower CLS attention (N0: the tokens that entered the LLM) that are still here."""
        tower = tokens.tower_attention.float()
        n = len(tokens)
        key = torch.zeros(n, dtype=torch.bool, device=tower.device)
        # Key tokens never leave (unless keep is below the key set), so the top ones still present are
        # the image's top ones.
        count = min(n, math.ceil(self.key_ratio * tokens.entered))
        if count:
            key[torch.topk(tower, count).indices] = True
        return key


@dataclass
class MustDropTowerMerge(MustDropMerge):
    """``mustdrop_merge`` as MustDrop's first stage: ``keep`` is the share of patches leaving the tower
    (the reference merges until ~76% remain), but never fewer than ``at_least`` (MustDrop's own
    ``keep``, an int or a fraction), so a ``keep`` that keeps every token merges nothing either."""

    at_least: int | float = 1

    name: ClassVar[str] = "mustdrop.merge"

    def leaving(self, patches: int, counted_on: int | None = None) -> int:
        return leaving_at_least(self, self.at_least, patches, counted_on)


@register
@dataclass
class MustDrop(Pipeline):
    """MustDrop as one pruner, its three stages: the tower merges similar ``window`` x ``window``
    windows (3 x 3) of patches after
    its first block until ``merge`` of the patches leave it (``mustdrop_merge``; the paper's figure
    reports ~76% retained; or ``merge_threshold``, the reference's adaptive rule, per image only); the
    LLM's prefill filters the tokens by the instruction's attention at four drop points, protecting the
    key set of highest CLS attention (``MustDropFilter``: ``keep`` is the mean number of visual tokens
    per decoder layer, or the paper's ``global_threshold`` and ``individual_threshold``); and for
    decoding, the layers from the first drop on hold only the final tokens (``MustDropCache``).

    ``keep`` defaults to 64 unless the thresholds are given; ``keep=1.0`` merges and drops nothing.
    The reference gives kept tokens positions that close up after each drop; here every token keeps
    its position, as in every LLM-stage pruner of vtprune.
    """

    keep: int | float | None = None
    merge: float = 0.76
    merge_threshold: float | None = None
    window: int = 3
    global_threshold: float | None = None
    individual_threshold: float | None = None
    key_ratio: float = KEY_RATIO
    budget: str = field(default="per_frame", kw_only=True)
    pruners: list = field(init=False, default_factory=list)

    name: ClassVar[str] = "mustdrop"
    stage: ClassVar[str] = "tower+llm+decode"

    def __post_init__(self) -> None:
        keep = self.keep
        m = self.merge
        if isinstance(m, bool) or not isinstance(m, numbers.Real) or not 0 < m <= 1:
            raise ValueError(f"merge must be a fraction in (0, 1] (of the patches leaving the tower), got {m!r}")
        if self.merge_threshold is not None:
            t = self.merge_threshold
            if isinstance(t, bool) or not isinstance(t, numbers.Real) or not -1 <= t <= 1:
                raise ValueError(f"merge_threshold must be a number in [-1, 1] (a window's mean cosine), got {t!r}")
            if self.merge != 0.76:
                raise ValueError("give merge (the share of patches leaving the tower) or merge_threshold, not both")
            tower = MustDropMerge(threshold=self.merge_threshold, window=self.window)
        else:
            tower = MustDropTowerMerge(keep=float(m), window=self.window, at_least=1 if keep is None else keep)
        self.pruners = [
            tower,
            MustDropFilter(
                keep=keep,
                global_threshold=self.global_threshold,
                individual_threshold=self.individual_threshold,
                key_ratio=self.key_ratio,
                budget=self.budget,
            ),
            MustDropCache(),
        ]
        super().__post_init__()

    def options(self) -> dict:
        return {
            "keep": self.keep,
            "merge": self.merge,
            "merge_threshold": self.merge_threshold,
            "window": self.window,
            "global_threshold": self.global_threshold,
            "individual_threshold": self.individual_threshold,
            "key_ratio": self.key_ratio,
            "budget": self.budget,
        }
