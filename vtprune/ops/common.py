"""Helpers shared by the torch references and the Triton kernels (one module, so neither imports the other)."""

from __future__ import annotations

import torch

EPS = 1e-8  # floor of the norms in transition variation's ratios and cosines


def check_selection_args(x: torch.Tensor, k: int) -> None:
    """Raise ValueError unless ``x`` is a float (N, D) or (B, N, D) tensor with rows and ``k`` an int >= 1."""
    if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3) or not x.is_floating_point():
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a float tensor of shape (N, D) or (B, N, D), got {shape}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    if x.shape[-2] == 0:
        raise ValueError("x has no rows to select from")


def as_fp32_batch(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) fp32 view of ``x``; copies only when ``x`` is in another dtype.

    fp32 whatever the model dtype: fp16 similarities tie far too often to rank thousands of tokens.
    """
    x = x[None] if x.dim() == 2 else x
    return x.float()


def inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """(B, N) fp32 reciprocal L2 norms of the rows of ``x`` (B, N, D); zero rows count as norm 1e-12."""
    return 1.0 / torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32).clamp_min(1e-12)
