"""Per-token magnitude and direction change of a sub-layer, reading both tensors once."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune.ops.common import EPS
from vtprune.ops.triton._util import pow2


@triton.jit
def _magnitude_direction_kernel(
    a_ptr,
    b_ptr,
    mag_ptr,
    dir_ptr,
    length,
    d,
    sa_b,
    sa_l,
    sb_b,
    sb_l,
    EPS: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    s = tl.program_id(1)
    toks = pid * BLOCK_L + tl.arange(0, BLOCK_L)
    tok_ok = toks < length
    aa = tl.zeros((BLOCK_L,), tl.float32)
    bb = tl.zeros((BLOCK_L,), tl.float32)
    ab = tl.zeros((BLOCK_L,), tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        ok = tok_ok[:, None] & (dims < d)[None, :]
        a = tl.load(a_ptr + s * sa_b + toks[:, None] * sa_l + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + s * sb_b + toks[:, None] * sb_l + dims[None, :], mask=ok, other=0.0).to(tl.float32)
        aa += tl.sum(a * a, axis=1)
        bb += tl.sum(b * b, axis=1)
        ab += tl.sum(a * b, axis=1)
    norm_a = tl.maximum(tl.sqrt(aa), EPS)
    norm_b = tl.maximum(tl.sqrt(bb), EPS)
    tl.store(mag_ptr + s * length + toks, norm_b / norm_a, mask=tok_ok)
    tl.store(dir_ptr + s * length + toks, 1.0 - ab / (norm_a * norm_b), mask=tok_ok)


def magnitude_and_direction(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of :func:`vtprune.ops.transition.magnitude_and_direction`; (B, L, D) -> 2 x (B, L)."""
    h_in, h_out = h_in.contiguous(), h_out.contiguous()
    b, length, d = h_in.shape
    magnitude = torch.empty((b, length), dtype=torch.float32, device=h_in.device)
    direction = torch.empty_like(magnitude)
    block_l = pow2(length, hi=64)
    _magnitude_direction_kernel[(triton.cdiv(length, block_l), b)](
        h_in,
        h_out,
        magnitude,
        direction,
        length,
        d,
        h_in.stride(0),
        h_in.stride(1),
        h_out.stride(0),
        h_out.stride(1),
        EPS=EPS,
        BLOCK_L=block_l,
        BLOCK_D=pow2(d, hi=128),
    )
    return magnitude, direction
