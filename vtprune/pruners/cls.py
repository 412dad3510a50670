"""CLS-attention pruning (VTC-CLS, Wang et al. 2024; FoPru, Jiang et al. 2024)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from vtprune.pruners.base import ModelInfo, VisionPruner, VisionTokens, top_k_sorted
from vtprune.registry import register

STRATEGIES = ("rank", "row")
_WARNED: set[tuple[str, str]] = set()  # (pruner, tower) pairs already warned about, once per process


@register
@dataclass
class CLSPrune(VisionPruner):
    """Keeps the tokens the vision tower's CLS token attends to most (head mean). On towers without a
    CLS token (SigLIP), the tokens that receive the most attention (mean over heads and queries),
    with a warning.

    layers: vision-encoder layers (0-based; negative counts from the end) whose CLS attention is
        summed. ``None`` uses the layer that produces the selected feature (``vision_feature_layer``;
        encoder layer 22 of 24 for LLaVA-1.5). ``layers=range(16, 23)`` is the VTC-CLS ensemble.
    strategy: ``"rank"`` keeps the global top-k; ``"row"`` (FoPru) keeps whole rows of the patch grid,
        best total attention first, and fills what is left of the budget with the best tokens of
        the next row.
    """

    layers: list[int] | None = None
    strategy: str = "rank"

    name = "cls"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.layers is not None:
            given = self.layers
            self.layers = list(given) if isinstance(given, (list, tuple, range)) else []
            if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
                raise ValueError(f"layers must be a non-empty list of ints or None, got {given!r}")

    def check(self, info: ModelInfo) -> None:
        warn_without_cls(info, self.name)
        n = info.num_tower_layers
        bad = [i for i in self.layers or [] if not -n <= i < n]
        if bad:
            raise ValueError(f"layers {bad} are outside the {n}-layer vision encoder (allowed: {-n}..{n - 1})")

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        n = info.num_tower_layers
        return sorted({i % n for i in self.layers}) if self.layers is not None else list(info.feature_layers)

    def score(self, tokens: VisionTokens) -> torch.Tensor:
        return tokens.cls_attention

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        if self.strategy == "rank":
            return super().select(tokens)
        if tokens.grid is None:
            raise ValueError("strategy='row' needs visual tokens that form a patch grid")
        return _best_rows(tokens.cls_attention, tokens.grid, tokens.keep)


def warn_without_cls(info: ModelInfo, pruner: str) -> None:
    """Say once per pruner and tower class that a tower without CLS token gets the substitute score."""
    if not info.tower_has_cls and (pruner, info.tower_name) not in _WARNED:
        _WARNED.add((pruner, info.tower_name))
        warnings.warn(
            f"the {pruner!r} pruner: {info.tower_name} has no CLS token; each patch is scored by the mean "
            "attention it receives instead (over heads and all tokens of the tower input)",
            stacklevel=6,  # the caller of vtprune.apply
        )


def _best_rows(scores: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    rows, cols = grid
    by_row = scores.float().reshape(rows, cols)
    order = torch.sort(by_row.sum(dim=1), descending=True, stable=True).indices
    full, rest = divmod(k, cols)
    kept = [order[:full, None] * cols + torch.arange(cols, device=scores.device)]
    if rest:
        row = order[full]
        kept.append(row * cols + top_k_sorted(by_row[row], rest)[None])
    return torch.cat([t.flatten() for t in kept]).sort().values
