"""Token transition variation (TransPrune, Li et al., 2025): how much a sub-layer changed each token.

TransPrune scores a token by how much an attention or MLP sub-layer transforms it: the ratio of
output to input norm (magnitude) times a softmax over tokens of the cosine distance between input
and output (direction). Scores of several sub-layers and layers are summed by the pruner.
"""

from __future__ import annotations

import torch

from vtprune.ops._backend import resolve_backend
from vtprune.ops.common import EPS


def _check(h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None) -> None:
    if h_in.shape != h_out.shape or h_in.dim() not in (2, 3):
        raise ValueError(
            f"h_in and h_out must both be (L, D) or (B, L, D) of one shape; got {tuple(h_in.shape)} "
            f"and {tuple(h_out.shape)}"
        )
    if mask is not None and tuple(mask.shape) != tuple(h_in.shape[:-1]):
        raise ValueError(f"mask must be {tuple(h_in.shape[:-1])} like the tokens, got {tuple(mask.shape)}")


def magnitude_and_direction(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token ``|h_out| / |h_in|`` and ``1 - cos(h_in, h_out)``, each (B, L) fp32, for (B, L, D) inputs."""
    a, b = h_in.float(), h_out.float()
    norm_a = torch.linalg.vector_norm(a, dim=-1).clamp_min(EPS)
    norm_b = torch.linalg.vector_norm(b, dim=-1).clamp_min(EPS)
    dot = (a * b).sum(dim=-1)
    return norm_b / norm_a, 1.0 - dot / (norm_a * norm_b)


def transition_variation(
    h_in: torch.Tensor, h_out: torch.Tensor, mask: torch.Tensor | None = None, *, backend: str = "auto"
) -> torch.Tensor:
    """TransPrune's transition weight of every token through one sub-layer.

    ``weight = |h_out| / |h_in| * softmax_over_tokens(1 - cos(h_in, h_out))``, the softmax taken per
    sample over the tokens where ``mask`` is True.

    Args:
        h_in: (L, D) or (B, L, D) sub-layer input (after its norm), any float dtype.
        h_out: same shape, the sub-layer output (before the residual add).
        mask: (L,) or (B, L) bool, False for padding; masked tokens get weight 0.
        backend: ``"auto"`` (Triton for CUDA tensors when installed), ``"torch"`` or ``"triton"``.

    Returns:
        (L,) or (B, L) fp32 weights; each sample's softmax part sums to 1 over its valid tokens.
    """
    _check(h_in, h_out, mask)
    impl = resolve_backend(backend, h_in, h_out)
    squeeze = h_in.dim() == 2
    if squeeze:
        h_in, h_out = h_in[None], h_out[None]
        mask = None if mask is None else mask[None]
    if impl == "triton":
        from vtprune.ops.triton import transition as kernels

        magnitude, direction = kernels.magnitude_and_direction(h_in, h_out)
    else:
        magnitude, direction = magnitude_and_direction(h_in, h_out)
    if mask is not None:
        direction = direction.masked_fill(~mask.to(direction.device, torch.bool), -float("inf"))
    weights = magnitude * direction.softmax(dim=-1).nan_to_num(0.0)
    return weights[0] if squeeze else weights
