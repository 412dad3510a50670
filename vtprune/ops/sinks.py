"""VFlowOpt's context relevance (Yang et al., ICCV 2025): the attention a vision-tower layer's *global*
tokens pay to every token.

A ViT's attention map has a few tokens nearly every query attends to (high-norm "sink" tokens that
gather the image's context). ``global_token_attention`` finds them as the tokens receiving more than
``threshold`` times the average attention (averaged over heads and all queries) and returns the mean
of their own attention rows: how much each token matters to the tokens that hold the context.
"""

from __future__ import annotations

import numbers

import torch


def global_token_attention(attention: torch.Tensor, threshold: float) -> torch.Tensor:
    """(T,) fp32 from ``attention`` (T, T), one tower input's head-mean attention probabilities (rows:
    queries). The global tokens are those whose received attention (column mean) exceeds ``threshold``
    times its mean (1/T); when none does, the token receiving most stands alone. The result sums to 1."""
    if attention.dim() != 2 or attention.shape[0] != attention.shape[1]:
        raise ValueError(f"attention must be (T, T), got {tuple(attention.shape)}")
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or threshold < 0:
        raise ValueError(f"threshold must be a number >= 0, got {threshold!r}")
    a = attention.float()
    received = a.mean(0)
    is_global = received > threshold * received.mean()
    if not bool(is_global.any()):
        is_global = received == received.max()
    return a[is_global].mean(0)
