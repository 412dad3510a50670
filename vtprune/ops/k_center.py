"""Greedy k-center (Gonzalez's farthest-first traversal), the diversity stage of ToDRE (Li et al., 2025)."""

from __future__ import annotations

import torch

from vtprune.ops._backend import resolve_backend
from vtprune.ops.common import as_fp32_batch, check_selection_args, inverse_norms
from vtprune.ops.diversity import greedy_farthest


def _check_first(first: int | torch.Tensor | None, b: int, n: int, device: torch.device) -> torch.Tensor | None:
    if first is None:
        return None
    if isinstance(first, torch.Tensor):
        if first.dtype.is_floating_point or first.dtype == torch.bool or first.numel() not in (1, b):
            raise ValueError(f"first must be an int or an integer tensor with 1 or B={b} elements, got {first!r}")
        first = first.reshape(-1).to(device, torch.long).expand(b)
    elif isinstance(first, bool) or not isinstance(first, int):
        raise ValueError(f"first must be None, an int or an integer tensor, got {type(first).__name__}")
    else:
        first = torch.full((b,), first, dtype=torch.long, device=device)
    if bool(((first < 0) | (first >= n)).any()):
        raise ValueError(f"first must index a row in 0..{n - 1}, got {first.tolist()}")
    return first


def most_central_row(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """(B,) index of the row with the highest cosine similarity to the mean row: a position-free seed."""
    mean = x.mean(dim=1)
    return (torch.einsum("bnd,bd->bn", x, mean) * inv).argmax(dim=-1)


def k_center(
    x: torch.Tensor, k: int, *, first: int | torch.Tensor | None = None, backend: str = "auto"
) -> torch.Tensor:
    """Greedy k-center selection under cosine distance.

    Starts from ``first`` and repeatedly adds the row farthest (least cosine-similar) from its
    closest selected centre, which is Gonzalez's 2-approximation of the k-center objective. It shares
    the running-minimum machinery of :func:`~vtprune.ops.max_min_diversity` and differs only in the
    seed: ToDRE seeds with the most important token (e.g. highest CLS attention), passed as ``first``.

    Args:
        x: (N, D) or (B, N, D) features, any float dtype (scored in fp32).
        k: number of centres, ``k >= 1``; values above N pick all N.
        first: seed row: an int, a (B,) or one-element integer tensor, or None for the row most similar
            to the mean of all rows.
        backend: ``"auto"`` (Triton for CUDA tensors when installed), ``"torch"`` or ``"triton"``.

    Returns:
        (k,) or (B, k) long indices in selection order, ``first`` first. Ties go to the lowest index.
    """
    check_selection_args(x, k)
    impl = resolve_backend(backend, x)
    squeeze = x.dim() == 2
    b, n = (1 if squeeze else x.shape[0]), x.shape[-2]
    seed = _check_first(first, b, n, x.device)
    k = min(k, n)
    xb = as_fp32_batch(x)
    inv = inverse_norms(xb)
    seed = most_central_row(xb, inv) if seed is None else seed
    if impl == "triton":
        from vtprune.ops.triton import diversity as kernels

        picks = kernels.greedy_farthest(x[None] if squeeze else x, inv, seed, k)
    else:
        picks = greedy_farthest(xb, inv, seed, k)
    return picks[0] if squeeze else picks
