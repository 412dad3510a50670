"""Density-peak clustering with k nearest neighbours (DPC-kNN), the grouping SparseVLM recycles
pruned tokens with (after TCFormer's, Zeng et al. 2022). Plain torch."""

from __future__ import annotations

import torch


def density_peak_clusters(x: torch.Tensor, clusters: int, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Split the rows of ``x`` into ``clusters`` groups around density peaks.

    x: (N, D) features. A row's distance to another is their Euclidean distance over sqrt(D); its
    density is exp(-mean squared distance to its ``k`` nearest rows, itself included) (``k`` default:
    ``clusters``, as SparseVLM's reference passes); its ``delta`` is its distance to the nearest denser
    row (the largest distance when none is denser). The ``clusters`` rows of highest density x delta
    are the centres, in that order; every other row joins its nearest centre. Computed in fp32, without
    the reference's 1e-6 random noise on the densities (so the result is deterministic; ties go to the
    lower index).

    Returns (assignment (N,) long cluster of each row, centres (clusters,) long row of each centre).
    """
    n = x.shape[0]
    clusters = max(1, min(clusters, n))
    k = min(clusters if k is None else k, n)
    x = x.float()
    dist = torch.cdist(x, x) / x.shape[1] ** 0.5
    nearest = torch.topk(dist, k, dim=1, largest=False).values
    density = torch.exp(-(nearest**2).mean(dim=1))
    denser = density[None, :] > density[:, None]  # [i, j]: row j is denser than row i
    delta = torch.where(denser, dist, dist.max()).min(dim=1).values
    score = delta * density
    centres = torch.sort(score, descending=True, stable=True).indices[:clusters]
    assignment = dist[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=x.device)
    return assignment, centres
