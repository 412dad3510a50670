"""Softmax attention of a few query rows, one program per (row, sample), heads looped inside.

Two passes over the keys per head: an online max / normaliser, then the probabilities. The head mean
is accumulated in the output row the program owns, so (B, Hq, R, L) is only written when asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune.ops.triton._util import pow2


@triton.jit
def _attention_rows_kernel(
    q_ptr,
    k_ptr,
    rows_ptr,
    mask_ptr,
    out_ptr,
    scale,
    hq,
    group,
    num_rows,
    length,
    d,
    sq_b,
    sq_h,
    sq_r,
    sk_b,
    sk_h,
    sk_l,
    CAUSAL: tl.constexpr,
    MASKED: tl.constexpr,
    PER_HEAD: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    r = tl.program_id(0)
    b = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < d
    last = length - 1
    if CAUSAL:
        last = tl.load(rows_ptr + b * num_rows + r)
    for h in range(hq):
        g = h // group
        q = tl.load(q_ptr + b * sq_b + h * sq_h + r * sq_r + dims, mask=dim_ok, other=0.0).to(tl.float32)
        k_bh = k_ptr + b * sk_b + g * sk_h
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.zeros((), tl.float32)
        for l0 in range(0, length, BLOCK_L):
            keys = l0 + tl.arange(0, BLOCK_L)
            visible = (keys < length) & (keys <= last)
            if MASKED:
                visible = visible & (tl.load(mask_ptr + b * length + keys, mask=keys < length, other=0) != 0)
            kt = tl.load(
                k_bh + keys[:, None] * sk_l + dims[None, :], mask=visible[:, None] & dim_ok[None, :], other=0.0
            ).to(tl.float32)
            logits = tl.where(visible, tl.sum(kt * q[None, :], axis=1) * scale, float("-inf"))
            new_top = tl.maximum(top, tl.max(logits, axis=0))
            # While every key so far is masked the maximum is -inf; shift by 0 then to avoid inf - inf.
            shift = tl.where(new_top == float("-inf"), 0.0, new_top)
            total = total * tl.exp(top - shift) + tl.sum(tl.exp(logits - shift), axis=0)
            top = new_top
        shift = tl.where(top == float("-inf"), 0.0, top)
        norm = tl.where(total > 0, total, 1.0)
        for l0 in range(0, length, BLOCK_L):
            keys = l0 + tl.arange(0, BLOCK_L)
            in_range = keys < length
            visible = in_range & (keys <= last)
            if MASKED:
                visible = visible & (tl.load(mask_ptr + b * length + keys, mask=in_range, other=0) != 0)
            kt = tl.load(
                k_bh + keys[:, None] * sk_l + dims[None, :], mask=visible[:, None] & dim_ok[None, :], other=0.0
            ).to(tl.float32)
            logits = tl.sum(kt * q[None, :], axis=1) * scale
            probs = tl.where(visible, tl.exp(logits - shift) / norm, 0.0)
            if PER_HEAD:
                tl.store(out_ptr + ((b * hq + h) * num_rows + r) * length + keys, probs, mask=in_range)
            else:
                row = out_ptr + (b * num_rows + r) * length + keys
                tl.store(row, tl.load(row, mask=in_range, other=0.0) + probs, mask=in_range)


def attention_rows(
    q: torch.Tensor,
    k: torch.Tensor,
    rows: torch.Tensor | None,
    key_mask: torch.Tensor | None,
    scale: float,
    per_head: bool,
) -> torch.Tensor:
    """Kernel version of :func:`vtprune.ops.attention_rows` (arguments already validated).

    q: (B, Hq, R, D), k: (B, Hkv, L, D), rows: (B, R) long or None, key_mask: (B, L) bool or None.
    Returns (B, R, L) or, with ``per_head``, (B, Hq, R, L) fp32.
    """
    q, k = q.contiguous(), k.contiguous()
    b, hq, r, d = q.shape
    length = k.shape[2]
    shape = (b, hq, r, length) if per_head else (b, r, length)
    out = torch.zeros(shape, dtype=torch.float32, device=q.device)
    rows_t = rows.contiguous() if rows is not None else out.new_empty(1, dtype=torch.long)
    mask_t = key_mask.to(torch.int8).contiguous() if key_mask is not None else out.new_empty(1, dtype=torch.int8)
    _attention_rows_kernel[(r, b)](
        q,
        k,
        rows_t,
        mask_t,
        out,
        scale,
        hq,
        hq // k.shape[1],
        r,
        length,
        d,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        CAUSAL=rows is not None,
        MASKED=key_mask is not None,
        PER_HEAD=per_head,
        BLOCK_L=pow2(length, hi=128),
        BLOCK_D=pow2(d, hi=None),
    )
    return out if per_head else out.div_(hq)
