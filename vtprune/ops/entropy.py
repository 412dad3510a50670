"""VFlowOpt's patch-level information entropy (Yang et al., ICCV 2025): how much grey-level variety
each image patch holds, from its pixels."""

from __future__ import annotations

import torch


def patch_entropy(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, P) Shannon entropy in bits of each ``patch`` x ``patch`` patch's grey-level histogram.

    pixels: (B, 3, H, W) RGB in [0, 255] (any float dtype), H and W multiples of ``patch``; patches
    in raster order. A pixel's grey level is the mean of its channels, rounded to one of 256 levels;
    a patch's histogram counts them (``p log p`` with ``p + 1e-10``, as the reference)."""
    if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[2] % patch or pixels.shape[3] % patch:
        raise ValueError(f"pixels must be (B, 3, H, W) with H and W multiples of {patch}, got {tuple(pixels.shape)}")
    grey = (pixels.float().clamp(0, 255).floor().sum(1) / 3).round().long().clamp(0, 255)  # (B, H, W)
    b, h, w = grey.shape
    levels = grey.view(b, h // patch, patch, w // patch, patch).permute(0, 1, 3, 2, 4).reshape(b, -1, patch * patch)
    counts = torch.zeros(*levels.shape[:2], 256, dtype=torch.float32, device=pixels.device)
    counts.scatter_add_(2, levels, torch.ones_like(levels, dtype=torch.float32))
    p = counts / (patch * patch)
    return -(p * torch.log2(p + 1e-10)).sum(-1)
