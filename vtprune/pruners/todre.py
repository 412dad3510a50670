"""ToDRE (Li et al., 2025): a diverse subset of the visual tokens before the LLM, and none of them in
the last layers when the instruction pays them little attention."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.core.schedule import DropPoint
from vtprune.ops import check_backend, k_center
from vtprune.pruners.base import LLMPruner, ModelInfo, PromptTokens, VisionPruner, VisionTokens
from vtprune.pruners.cls import warn_without_cls
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import register


@dataclass
class ToDREDiversity(VisionPruner):
    """Greedy k-center over the cosine distance of projected tokens (``ops.k_center``), seeded with
    the token of highest CLS attention (towers without CLS: the ``cls`` pruner's substitute)."""

    backend: str = "auto"

    name: ClassVar[str] = "todre.diversity"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_backend(self.backend)

    def check(self, info: ModelInfo) -> None:
        warn_without_cls(info, self.name)

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        return list(info.feature_layers)

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        pivot = int(torch.argmax(tokens.cls_attention))
        return k_center(tokens.features, tokens.keep, first=pivot, backend=self.backend).sort().values


@dataclass
class ToDRERelevance(LLMPruner):
    """From decoder layer ``layer`` on, an image's visual tokens are all dropped when the instruction
    (the text after the last image) gives them less than ``threshold`` of its attention at layer
    ``layer - 1`` (head and query mean, summed over the image's tokens); otherwise they all stay.
    ``keep`` is not used: the tokens that entered the LLM stay until ``layer``."""

    layer: int | None = None
    threshold: float = 0.1

    name: ClassVar[str] = "todre.relevance"
    signals: ClassVar[tuple[str, ...]] = ("instruction",)
    score_offset: ClassVar[int] = 1
    always_selects: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, numbers.Real) or not 0 <= t <= 1:
            raise ValueError(f"threshold must be a float in [0, 1] (a share of the instruction's attention), got {t!r}")
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(
                f"layer must be an int (the first decoder layer without visual tokens) or None, got {self.layer!r}"
            )

    def resolved_layer(self, info: ModelInfo) -> int:
        n = info.num_decoder_layers
        return self.layer if self.layer is not None else min(n - 1, 7 * n // 8 + 1)

    def check(self, info: ModelInfo) -> None:
        n = info.num_decoder_layers
        if not 1 <= self.resolved_layer(info) < n:
            raise ValueError(
                f"layer must be an int in [1, {n - 1}] for this {n}-layer decoder (relevance is measured at "
                f"layer-1, visual tokens dropped before layer), got {self.layer!r}"
            )

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        return [DropPoint(self.resolved_layer(info), n_tokens)]

    def select(self, tokens: PromptTokens) -> torch.Tensor:
        relevance = float(tokens.instruction_attention.sum())
        if relevance < self.threshold:
            return torch.zeros(0, dtype=torch.long, device=tokens.positions.device)
        return torch.arange(tokens.positions.numel(), device=tokens.positions.device)


@register
@dataclass
class ToDRE(Pipeline):
    """ToDRE as one pruner: ``keep`` tokens per image chosen by greedy k-center diversity before the
    LLM (seeded with the highest CLS attention), then, from decoder layer ``layer`` (default: just
    after 7/8 of the depth), none of an image's tokens when the instruction gives them less than
    ``threshold`` of its attention at the layer before (the paper's observation that late layers
    often need no visual tokens).

    The paper (v2) gates the late drop on both text->visual and visual->text attention shares; in a
    prompt whose question follows the image, causal attention makes the visual->text share zero, so
    the text->visual share decides here, per image.
    """

    keep: int | float = 64
    layer: int | None = None
    threshold: float = 0.1
    backend: str = "auto"
    budget: str = field(default="per_frame", kw_only=True)
    pruners: list = field(init=False, default_factory=list)

    name: ClassVar[str] = "todre"
    stage: ClassVar[str] = "vision+llm"
    late_gate: ClassVar[bool] = True

    def __post_init__(self) -> None:
        # Each stage checks its own options (budget, threshold, layer) as it is built.
        self.pruners = [
            ToDREDiversity(keep=self.keep, backend=self.backend, budget=self.budget),
            ToDRERelevance(keep=self.keep, layer=self.layer, threshold=self.threshold, budget=self.budget),
        ]
        super().__post_init__()

    def options(self) -> dict:
        return {"keep": self.keep, "layer": self.layer, "threshold": self.threshold, "budget": self.budget}
