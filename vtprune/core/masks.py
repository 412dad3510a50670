"""Attention masks for decoder layers whose keys (and, at prefill, queries) were compacted.

Transformers hands every decoder layer the same mask, in a form that depends on the attention
implementation: None (SDPA or flash without padding), a bool (B, 1, Q, KV) tensor (SDPA), an additive
float one (eager), or a 2-D (B, KV) padding mask (flash attention). The mask is rebuilt in the same
form for the compacted layout, so every implementation keeps working.
"""

from __future__ import annotations

import torch


def _allowed(mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, device) -> torch.Tensor:
    """Any incoming mask as bool (B, 1, Q, KV), True where a query may attend to a key."""
    if mask is not None and mask.dim() == 4:
        allowed = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        return allowed.expand(batch, 1, q_len, kv_len)
    past = kv_len - q_len
    causal = torch.arange(kv_len, device=device)[None, :] <= torch.arange(past, kv_len, device=device)[:, None]
    allowed = causal[None, None].expand(batch, 1, q_len, kv_len)
    if mask is not None:  # 2-D padding mask (flash attention)
        allowed = allowed & mask.bool()[:, None, None, :]
    return allowed


def compact_mask(
    mask: torch.Tensor | None,
    *,
    q_index: torch.Tensor | None,
    q_valid: torch.Tensor | None,
    kv_index: torch.Tensor,
    kv_valid: torch.Tensor,
    q_len: int,
    kv_len: int,
    flash: bool,
) -> torch.Tensor | None:
    """The mask for compacted queries and keys, in the incoming mask's own form.

    q_index/q_valid: (B, Q') original query rows of the compacted queries, or None when the
        queries were not compacted (decode steps).
    kv_index/kv_valid: (B, KV') original key columns of the compacted keys.
    q_len/kv_len: the original (uncompacted) query and key lengths the incoming mask describes.
    flash: whether the layer runs a flash-attention kernel (which takes 2-D padding masks).
    """
    batch = kv_index.shape[0]
    if bool(kv_valid.all()) and (q_valid is None or bool(q_valid.all())) and mask is None:
        return None  # plain causal attention over the kept tokens: the kernels' fast path
    if flash:
        pad = torch.ones(batch, kv_len, dtype=torch.bool, device=kv_index.device) if mask is None else mask.bool()
        return (pad.gather(1, kv_index) & kv_valid).to(mask.dtype if mask is not None else torch.long)

    allowed = _allowed(mask, batch, q_len, kv_len, kv_index.device)
    if q_index is not None:
        allowed = allowed.gather(2, q_index[:, None, :, None].expand(-1, 1, -1, kv_len))
    rows = allowed.shape[2]
    allowed = allowed.gather(3, kv_index[:, None, None, :].expand(-1, 1, rows, -1)) & kv_valid[:, None, None, :]
    if q_valid is not None:
        # Padding rows attend to themselves only, so softmax never sees an all-masked row (NaN).
        eye = torch.eye(rows, kv_index.shape[1], dtype=torch.bool, device=kv_index.device)
        allowed = torch.where(q_valid[:, None, :, None], allowed, eye)
    if mask is None or mask.dtype == torch.bool:
        return allowed
    additive = torch.zeros(allowed.shape, dtype=mask.dtype, device=mask.device)
    return additive.masked_fill_(~allowed, torch.finfo(mask.dtype).min)
