"""Greedy Max-Min Diversity selection (the rule of DivPrune, Alvar et al., CVPR 2025)."""

from __future__ import annotations

import torch

from vtprune.ops._backend import check_backend


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    # fp32 whatever the model dtype: fp16 cosine distances tie far too often to rank 2,880 tokens.
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _farthest_nearest_neighbour(u: torch.Tensor, block: int) -> torch.Tensor:
    """Index of the row whose nearest other row is farthest away, per batch.

    u: (B, N, D) unit rows. Returns (B,) long. Works on (block, N) slices of the distance matrix so
    memory stays O(N * block) instead of O(N^2).
    """
    b, n, _ = u.shape
    nearest = torch.empty(b, n, dtype=u.dtype, device=u.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        dist = 1.0 - torch.bmm(u[:, start:stop], u.transpose(1, 2))  # (B, block, N)
        rows = torch.arange(start, stop, device=u.device)
        dist[:, rows - start, rows] = float("inf")  # a token is not its own neighbour
        nearest[:, start:stop] = dist.min(dim=-1).values
    if n == 1:
        nearest.zero_()
    return nearest.argmax(dim=-1)


def max_min_diversity(x: torch.Tensor, k: int, *, block: int = 1024, backend: str = "auto") -> torch.Tensor:
    """Greedy Max-Min Diversity subset of the rows of ``x`` under cosine distance.

    The first pick is the row whose nearest neighbour (other than itself) is farthest; every next
    pick is the row whose distance to the closest already-picked row is largest. Ties go to the
    lowest index. Picked rows are never picked again, even when exact duplicates make every
    remaining distance zero.

    Args:
        x: (N, D) or (B, N, D) features, any float dtype (scored in fp32).
        k: number of rows to pick, 1 <= k; values above N pick all N.
        block: rows of the distance matrix materialised at once for the first pick.
        backend: ``"auto"`` or ``"torch"``.

    Returns:
        (k,) or (B, k) long indices in selection order (not sorted).
    """
    check_backend(backend)
    if x.dim() not in (2, 3):
        raise ValueError(f"x must be (N, D) or (B, N, D), got shape {tuple(x.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    squeeze = x.dim() == 2
    u = _unit_rows(x[None] if squeeze else x)
    b, n, _ = u.shape
    k = min(k, n)
    batch = torch.arange(b, device=u.device)
    picks = torch.empty(b, k, dtype=torch.long, device=u.device)
    picks[:, 0] = _farthest_nearest_neighbour(u, block)
    # Running distance from every row to its closest picked row: O(N) state, one (N,) update per pick.
    closest = 1.0 - torch.einsum("bnd,bd->bn", u, u[batch, picks[:, 0]])
    closest[batch, picks[:, 0]] = -float("inf")
    for i in range(1, k):
        pick = closest.argmax(dim=-1)
        picks[:, i] = pick
        closest = torch.minimum(closest, 1.0 - torch.einsum("bnd,bd->bn", u, u[batch, pick]))
        closest[batch, pick] = -float("inf")
    return picks[0] if squeeze else picks
