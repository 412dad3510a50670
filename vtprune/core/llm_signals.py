"""The scores LLM-stage pruners rank visual tokens by, computed at a decoder layer's input.

Attention signals are recomputed from the layer's own queries and keys (``query_key``) for the few
query rows they need, so SDPA and flash attention never have to return attention weights. All
results are (B, L) fp32 over the layer's current (possibly compacted) sequence.
"""

from __future__ import annotations

import torch

from vtprune.ops import attention_rows


def last_token_attention(query_key, layer, hidden, position_embeddings, row: int, key_mask) -> torch.Tensor:
    """Head-mean attention of query ``row`` (the same position in every sample) over all keys."""
    rows = torch.tensor([row], device=hidden.device)
    with torch.no_grad():
        q, k, scale = query_key(layer, hidden, position_embeddings, rows)
        return attention_rows(q, k, rows, key_mask=key_mask, scale=scale)[:, 0]


def instruction_attention(
    query_key, layer, hidden, position_embeddings, rows: list[torch.Tensor], key_mask
) -> torch.Tensor:
    """Head- and query-mean attention of each sample's instruction rows (``rows[b]``, (R_b,)) over all keys."""
    out = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for b, r in enumerate(rows):
            pe = tuple(t[b : b + 1] if t.shape[0] > 1 else t for t in position_embeddings)
            r = r.to(hidden.device)
            q, k, scale = query_key(layer, hidden[b : b + 1], pe, r)
            mask = None if key_mask is None else key_mask[b : b + 1]
            out[b] = attention_rows(q, k, r, key_mask=mask, scale=scale)[0].mean(dim=0)
    return out
