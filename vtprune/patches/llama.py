"""Llama-style decoder layers (Llama, Mistral, Qwen2, ...): their attention queries and keys.

The LLM stage needs a few rows of a layer's attention map, which SDPA and flash attention never
return; this recomputes the layer's queries and keys exactly as its attention module does.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from vtprune.core.decoder import DecoderAccess


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layer: nn.Module) -> torch.Tensor:
    # Use the model's own rotary function so variants (partial rotary, scaling) stay exact.
    apply = sys.modules[type(layer.self_attn).__module__].apply_rotary_pos_emb
    return apply(x, x, cos, sin)[0]


def query_key(
    layer: nn.Module,
    hidden: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    rows: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Queries of ``rows`` and keys of all positions, as decoder ``layer`` computes them.

    hidden: (B, L, D) the layer's input; position_embeddings: (cos, sin), each (B or 1, L, head_dim);
    rows: (R,) positions. Returns q (B, Hq, R, head_dim), k (B, Hkv, L, head_dim) and the softmax scale.
    """
    attn = layer.self_attn
    b, length, _ = hidden.shape
    head_dim = attn.head_dim
    x = layer.input_layernorm(hidden)
    q = attn.q_proj(x[:, rows]).view(b, rows.numel(), -1, head_dim)
    k = attn.k_proj(x).view(b, length, -1, head_dim)
    if getattr(attn, "q_norm", None) is not None:  # Qwen3-style per-head norms
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = position_embeddings
    q = _rotate(q, cos[:, rows], sin[:, rows], layer)
    k = _rotate(k, cos, sin, layer)
    return q, k, attn.scaling


def sublayers(layer: nn.Module) -> tuple[nn.Module, nn.Module]:
    """A decoder layer's attention and MLP sub-layers. Each is called on its own normed input and
    returns what is added to the residual stream (the attention as ``(output, weights)``)."""
    return layer.self_attn, layer.mlp


LLAMA = DecoderAccess(query_key, sublayers)
