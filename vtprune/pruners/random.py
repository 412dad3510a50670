"""Uniformly random visual tokens: the floor every scoring rule has to beat."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from vtprune.pruners.base import VisionPruner, VisionTokens
from vtprune.registry import register


@register
@dataclass
class RandomPrune(VisionPruner):
    """Keeps a seeded uniform sample of each image's tokens.

    Every image is sampled with a fresh generator seeded by ``seed``, so the choice for an image does
    not depend on what else is in the batch (images with the same token count get the same subset).
    """

    seed: int = 0

    name = "random"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
            raise ValueError(f"seed must be an int, got {self.seed!r}")

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        n = tokens.features.shape[0]
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(n, generator=generator)[: tokens.keep].sort().values.to(tokens.features.device)
