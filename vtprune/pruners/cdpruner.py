"""CDPruner (Zhang et al., NeurIPS 2025): keep the visual tokens of greatest *conditional* diversity, a
set both relevant to the instruction and unlike each other, chosen by a determinantal point process."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

import torch

from vtprune.ops.dpp import conditional_dpp, instruction_relevance
from vtprune.pruners.base import VisionPruner, VisionTokens
from vtprune.registry import register


@register
@dataclass
class CDPruner(VisionPruner):
    """Greedy MAP inference of a DPP over the projected visual tokens whose kernel is their cosine
    similarity weighted by each token's relevance to the instruction: L = diag(r) S diag(r).

    The relevance r of a token is its mean cosine similarity with the instruction's input embeddings,
    negated (``negate``, as the reference code does) and min-max normalised over the image's tokens to
    [0, 1]. The instruction is the image's paired text (the prompt's text after it, up to the next
    image), or the text before it when none follows. The reference scores relevance with CLIP's text
    tower; here both sides are in the language model's embedding space, which every family has (as in
    the model-agnostic port of the method), so no second model is loaded.

    theta: None uses r as it is (the reference code's default); a value in [0, 1) uses
        exp(theta / (2 (1 - theta)) r) instead (the paper's trade-off: 0 is plain diversity, nearer 1
        weighs relevance more).
    """

    theta: float | None = None
    negate: bool = True

    name: ClassVar[str] = "cdpruner"
    reads_text: ClassVar[bool] = True
    text_or_before: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.theta is not None and (
            isinstance(self.theta, bool) or not isinstance(self.theta, numbers.Real) or not 0 <= self.theta < 1
        ):
            raise ValueError(f"theta must be None or a number in [0, 1), got {self.theta!r}")
        if not isinstance(self.negate, bool):
            raise ValueError(f"negate must be True or False, got {self.negate!r}")

    def quality(self, tokens: VisionTokens) -> torch.Tensor:
        """(N,) fp32 the kernel's per-token weight: the instruction relevance, or its exponential."""
        relevance = instruction_relevance(tokens.features, tokens.text, negate=self.negate)
        if self.theta is None:
            return relevance
        return torch.exp(self.theta / (2 * (1 - self.theta)) * relevance)

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        if tokens.keep >= len(tokens):
            return torch.arange(len(tokens), device=tokens.features.device)
        return conditional_dpp(tokens.features, self.quality(tokens), tokens.keep).sort().values
