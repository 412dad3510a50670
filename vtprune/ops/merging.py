"""Token merging: assigning tokens to merge targets (VisionZip's contextual tokens)."""

from __future__ import annotations

import torch


def strided_targets(n: int, count: int) -> torch.Tensor:
    """(min(count, n),) evenly strided indices into n items (stride ``max(1, n // count)``, from 0),
    as VisionZip picks its contextual targets among the tokens left after the dominant ones."""
    step = max(1, n // count)
    return torch.arange(0, n, step)[:count]


def nearest_targets(x: torch.Tensor, targets: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """For each row in ``others``, the target most similar to it by cosine similarity.

    x: (N, d) vectors (any float dtype; compared in fp32); targets: (c,) and others: (m,) long indices
    into x. Returns (m,) long indices into ``targets`` (ties: the earlier target).
    """
    unit = torch.nn.functional.normalize(x.float(), dim=-1)
    return (unit[others] @ unit[targets].T).argmax(dim=-1)
