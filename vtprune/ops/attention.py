"""Softmax attention of a few query rows, recomputed outside the model's attention kernel.

SDPA and flash attention never materialise attention probabilities, so pruners that rank tokens by
attention recompute just the rows they need from the layer's queries and keys.
"""

from __future__ import annotations

import torch

from vtprune.ops._backend import resolve_backend


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor | None = None,
    *,
    key_mask: torch.Tensor | None = None,
    scale: float | None = None,
    per_head: bool = False,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention probabilities of ``R`` query rows against ``L`` keys, in fp32.

    Args:
        q: (B, Hq, R, D) queries of the rows of interest (rotary embedding already applied).
        k: (B, Hkv, L, D) keys; ``Hq`` must be a multiple of ``Hkv`` (grouped-query attention).
        rows: positions in ``0..L-1`` of the ``R`` query rows, (R,) or (B, R). When given, the
            attention is causal: row ``r`` sees keys ``0..rows[r]``. ``None`` means no causal mask
            (bidirectional encoders such as a ViT).
        key_mask: (B, L) bool, False for keys nobody may attend to (padding).
        scale: softmax temperature; defaults to ``D ** -0.5``.
        per_head: return (B, Hq, R, L) instead of the head mean.
        backend: ``"auto"`` (Triton for CUDA tensors when installed), ``"torch"`` or ``"triton"``.

    Returns:
        (B, R, L) fp32 head-mean probabilities (each row sums to 1 over its visible keys), or
        (B, Hq, R, L) with ``per_head=True``.
    """
    if q.dim() != 4 or k.dim() != 4 or k.shape[0] != q.shape[0] or k.shape[3] != q.shape[3] or q.shape[1] % k.shape[1]:
        raise ValueError(
            f"q must be (B, Hq, R, D) and k (B, Hkv, L, D) with Hq % Hkv == 0; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    b, hq, r, d = q.shape
    length = k.shape[2]
    if rows is not None:
        if rows.dim() not in (1, 2) or rows.shape[-1] != r or (rows.dim() == 2 and rows.shape[0] != b):
            raise ValueError(f"rows must be (R,) or (B, R) with R={r}, got {tuple(rows.shape)}")
        rows = rows.to(q.device, torch.long).expand(b, r)
    if key_mask is not None:
        if tuple(key_mask.shape) != (b, length):
            raise ValueError(f"key_mask must be (B, L) = {(b, length)}, got {tuple(key_mask.shape)}")
        key_mask = key_mask.to(q.device, torch.bool)
    scale = d**-0.5 if scale is None else float(scale)
    if resolve_backend(backend, q, k) == "triton":
        from vtprune.ops.triton import attention as kernels

        return kernels.attention_rows(q, k, rows, key_mask, scale, per_head)
    hkv = k.shape[1]
    # Group query heads by the key head they share instead of repeating keys.
    qg = q.float().reshape(b, hkv, hq // hkv, r, d)
    logits = torch.einsum("bgqrd,bgld->bgqrl", qg, k.float()).reshape(b, hq, r, length) * scale
    visible = torch.ones(b, 1, r, length, dtype=torch.bool, device=q.device)
    if rows is not None:
        visible = visible & (torch.arange(length, device=q.device) <= rows[..., None])[:, None]
    if key_mask is not None:
        visible = visible & key_mask[:, None, None, :]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(dim=-1).nan_to_num(0.0)
    return probs if per_head else probs.mean(dim=1)
