"""What every pruner shares: the token budget, the two stages and the inputs each stage scores."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What a pruner may know of the model it is applied to (filled in by the model-family adapter)."""

    num_decoder_layers: int
    num_tower_layers: int
    tower_has_cls: bool
    tower_name: str
    feature_layers: tuple[int, ...]  # encoder layers (0-based) whose output feeds the projector


@dataclass
class VisionTokens:
    """One image's visual tokens, as the vision stage scores them.

    features: (N, D) tokens after the projector, in the model's dtype.
    grid: (rows, cols) of the patch grid when the N tokens are exactly that grid in raster order.
    cls_attention: (N,) fp32 attention from the tower's CLS token, summed over the layers the pruner
        asked for; None unless the pruner asked.
    """

    features: torch.Tensor
    grid: tuple[int, int] | None = None
    cls_attention: torch.Tensor | None = None


@dataclass
class PromptTokens:
    """One image's visual tokens inside the language model, as the LLM stage scores them.

    attention: (N,) fp32 head-mean attention from the prompt's last token to these tokens at the
        decoder layer before the pruning layer.
    """

    attention: torch.Tensor


def _checked_keep(keep) -> int | float:
    """``keep`` as a plain int or float (NumPy scalars accepted), or a clear error."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be an int (tokens per image) or a float in (0, 1] (a fraction), got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep <= 0:
            raise ValueError(f"keep must be >= 1 when an int (visual tokens kept per image), got {keep}")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1] when a float (fraction of visual tokens kept), got {keep}")
    return float(keep)


@dataclass
class Pruner:
    """Base of all pruners. ``keep``: an int is visual tokens kept per image (capped at what the
    image has), a float in (0, 1] is the fraction of them (rounded, at least one)."""

    keep: int | float = 64

    name: ClassVar[str] = ""
    stage: ClassVar[str] = ""  # "vision": before the LLM; "llm": inside a decoder layer

    def __post_init__(self) -> None:
        self.keep = _checked_keep(self.keep)

    def budget(self, n: int) -> int:
        """Tokens to keep out of ``n``."""
        if isinstance(self.keep, float):
            return min(n, max(1, round(self.keep * n)))
        return min(n, self.keep)

    def check(self, info: ModelInfo) -> None:
        """Raise ValueError if this pruner cannot run on the described model."""

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass
class VisionPruner(Pruner):
    """Selects visual tokens from the image features, before the language model."""

    stage: ClassVar[str] = "vision"

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        """Vision-encoder layers whose CLS attention this pruner scores with (none by default)."""
        return []

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        """Ascending (k,) long indices into ``tokens.features`` of the tokens to keep."""
        raise NotImplementedError


@dataclass
class LLMPruner(Pruner):
    """Drops visual tokens inside the language model, before decoder layer ``layer`` (0-based)."""

    layer: int = 2

    stage: ClassVar[str] = "llm"

    def check(self, info: ModelInfo) -> None:
        n = info.num_decoder_layers
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or not 1 <= self.layer < n:
            raise ValueError(
                f"layer must be an int in [1, {n - 1}] for this {n}-layer decoder (tokens are scored at "
                f"layer-1 and dropped before layer), got {self.layer!r}"
            )

    def select(self, tokens: PromptTokens) -> torch.Tensor:
        """Ascending (k,) long indices into the image's visual tokens to keep."""
        raise NotImplementedError


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties: lower index first)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return order.sort().values
