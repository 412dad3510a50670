"""Greedy farthest-point selection under cosine distance: Max-Min Diversity (DivPrune) and its machinery.

Everything works on cosine *similarities* (distance = 1 - similarity, a monotone map, so the largest
distance is the smallest similarity) with a running per-row maximum: memory stays O(N) plus one
(block, N) slice for the first pick, never the N x N matrix.
"""

from __future__ import annotations

import torch

from vtprune.ops._backend import resolve_backend
from vtprune.ops.common import as_fp32_batch, check_selection_args, inverse_norms

# Elements of the (block, N) similarity slice materialised at once for the first pick (16 MiB fp32).
_SLICE_ELEMENTS = 1 << 22


def nearest_similarity(x: torch.Tensor, inv: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """(B, N) cosine similarity of every row to its most similar *other* row (-inf when N == 1).

    x: (B, N, D) fp32, inv: (B, N) from :func:`inverse_norms`. Works on (block, N) slices.
    """
    b, n, _ = x.shape
    # At most 16 MiB and at most an eighth of the matrix, so the saving holds for small N too.
    block = block or max(1, min(_SLICE_ELEMENTS // n, n // 8))
    nearest = torch.empty(b, n, dtype=torch.float32, device=x.device)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = torch.bmm(x[:, start:stop], x.transpose(1, 2))  # (B, block, N): the only O(block * N) buffer
        sim.mul_(inv[:, start:stop, None]).mul_(inv[:, None, :])
        rows = torch.arange(start, stop, device=x.device)
        sim[:, rows - start, rows] = -float("inf")  # a row is not its own neighbour
        nearest[:, start:stop] = sim.amax(dim=-1)
    return nearest


def greedy_farthest(x: torch.Tensor, inv: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Grow a selection from ``first`` by repeatedly taking the row least similar to everything picked.

    x: (B, N, D) fp32, inv: (B, N), first: (B,) long. Returns (B, k) long in selection order; ties go to
    the lowest index, and a picked row is never picked again. One (B, N) update per pick.
    """
    b = x.shape[0]
    batch = torch.arange(b, device=x.device)
    picks = torch.empty(b, k, dtype=torch.long, device=x.device)
    closest = torch.full_like(inv, -float("inf"))  # similarity of each row to its most similar pick
    pick = first
    for i in range(k):
        picks[:, i] = pick
        if i == k - 1:
            break
        sim = torch.einsum("bnd,bd->bn", x, x[batch, pick]) * inv * inv[batch, pick, None]
        closest = torch.maximum(closest, sim)
        closest[batch, picks[:, i]] = float("inf")
        pick = closest.argmin(dim=-1)
    return picks


def max_min_diversity(x: torch.Tensor, k: int, *, block: int | None = None, backend: str = "auto") -> torch.Tensor:
    """Greedy Max-Min Diversity subset of the rows of ``x`` under cosine distance (DivPrune's rule).

    The first pick is the row whose nearest other row is farthest away; every next pick is the row
    whose distance to the closest already-picked row is largest. Ties (in fp32 cosine similarity) go
    to the lowest index. Picked rows are never picked again, even when exact duplicates make every
    remaining distance zero.

    Args:
        x: (N, D) or (B, N, D) features, any float dtype (scored in fp32).
        k: number of rows to pick, ``k >= 1``; values above N pick all N.
        block: rows of the similarity matrix materialised at once for the first pick; by default the
            slice is at most 16 MiB and at most an eighth of the matrix.
        backend: ``"auto"`` (Triton for CUDA tensors when installed), ``"torch"`` or ``"triton"``.

    Returns:
        (k,) or (B, k) long indices in selection order (not sorted).

    Memory: O(N * block + N * k) besides an fp32 copy of ``x`` when it is fp16/bf16.
    """
    check_selection_args(x, k)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be an int >= 1 or None, got {block!r}")
    impl = resolve_backend(backend, x)
    squeeze = x.dim() == 2
    k = min(k, x.shape[-2])
    if impl == "triton":
        from vtprune.ops.triton import diversity as kernels

        picks = kernels.max_min_diversity(x[None] if squeeze else x, k)
    else:
        xb = as_fp32_batch(x)
        inv = inverse_norms(xb)
        first = nearest_similarity(xb, inv, block).argmin(dim=-1)
        picks = greedy_farthest(xb, inv, first, k)
    return picks[0] if squeeze else picks
