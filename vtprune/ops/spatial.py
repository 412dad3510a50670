"""Spreading picks over the image plane: the spatial term of adaptive pruning."""

from __future__ import annotations

import torch


def farthest_points(coords: torch.Tensor, chosen: torch.Tensor, k: int) -> torch.Tensor:
    """Greedily add ``k`` rows of ``coords`` that are farthest (Euclidean) from everything chosen.

    Args:
        coords: (N, C) positions (e.g. (row, col) on the patch grid).
        chosen: (N,) bool, rows already chosen; when none is, the first pick is the row closest to
            the centroid.
        k: rows to add (capped at the rows not chosen yet).

    Returns:
        (k,) long indices of the added rows, in the order they were picked. Ties go to the lowest index.
    """
    if coords.dim() != 2 or chosen.shape != coords.shape[:1]:
        raise ValueError(f"coords must be (N, C) and chosen (N,); got {tuple(coords.shape)} and {tuple(chosen.shape)}")
    x = coords.float()
    taken = chosen.clone().bool()
    k = min(int(k), int((~taken).sum()))
    picks = []
    if k and not taken.any():
        first = int(torch.argmin(torch.linalg.vector_norm(x - x.mean(0), dim=1)))
        picks.append(first)
        taken[first] = True
    nearest = torch.cdist(x, x[taken]).min(dim=1).values if taken.any() else None
    while len(picks) < k:
        i = int(torch.argmax(nearest.masked_fill(taken, -float("inf"))))
        picks.append(i)
        taken[i] = True
        nearest = torch.minimum(nearest, torch.linalg.vector_norm(x - x[i], dim=1))
    return torch.tensor(picks, dtype=torch.long, device=coords.device)
