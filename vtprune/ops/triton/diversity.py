"""Greedy farthest-point selection on the device: one kernel launch per pick, no host synchronisation.

Each launch updates the running "most similar pick" of a block of rows and leaves that block's best
candidate (value, index) in a small buffer. The next launch starts with every program reducing those
per-block candidates itself (a few hundred floats), so the winner never has to travel to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vtprune.ops.common import inverse_norms
from vtprune.ops.triton._util import pow2


@triton.jit
def _nearest_similarity_kernel(
    x_ptr,
    inv_ptr,
    out_ptr,
    n,
    d,
    stride_xb,
    stride_xn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out[b, i] = max over j != i of cos(x[b, i], x[b, j]); a tiled Gram matrix that is never stored."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    x_b = x_ptr + b * stride_xb
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n
    inv_rows = tl.load(inv_ptr + b * n + rows, mask=row_ok, other=0.0)
    best = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start in range(0, n, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_ok = cols < n
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
        for d0 in range(0, d, BLOCK_D):
            dims = d0 + tl.arange(0, BLOCK_D)
            dim_ok = dims < d
            a = tl.load(
                x_b + rows[:, None] * stride_xn + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
            ).to(tl.float32)
            c = tl.load(
                x_b + cols[:, None] * stride_xn + dims[None, :], mask=col_ok[:, None] & dim_ok[None, :], other=0.0
            ).to(tl.float32)
            # ieee: TF32 would change which token wins a near tie.
            acc = tl.dot(a, tl.trans(c), acc, input_precision="ieee")
        inv_cols = tl.load(inv_ptr + b * n + cols, mask=col_ok, other=0.0)
        sim = acc * inv_rows[:, None] * inv_cols[None, :]
        sim = tl.where(col_ok[None, :] & (rows[:, None] != cols[None, :]), sim, float("-inf"))
        best = tl.maximum(best, tl.max(sim, axis=1))
    tl.store(out_ptr + b * n + rows, best, mask=row_ok)


@triton.jit(do_not_specialize=["step"])
def _greedy_step_kernel(
    x_ptr,
    inv_ptr,
    closest_ptr,
    cand_val_ptr,
    cand_idx_ptr,
    picks_ptr,
    step,
    n,
    d,
    num_blocks,
    stride_xb,
    stride_xn,
    batch,
    k,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    CANDIDATES: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    # Candidates of the previous launch live in half (step - 1) % 2 of the double buffer; this launch
    # writes the other half, so no program reads a slot another program of the same launch writes.
    slot = tl.arange(0, CANDIDATES)
    prev = ((step - 1) % 2) * batch * CANDIDATES + b * CANDIDATES
    vals = tl.load(cand_val_ptr + prev + slot, mask=slot < num_blocks, other=float("inf"))
    winner = tl.argmin(vals, axis=0, tie_break_left=True)  # lowest block holds the lowest index
    pick = tl.load(cand_idx_ptr + prev + winner)
    if pid == 0:
        tl.store(picks_ptr + b * k + step - 1, pick)

    x_b = x_ptr + b * stride_xb
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    dot = tl.zeros((BLOCK_N,), tl.float32)
    for d0 in range(0, d, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        dim_ok = dims < d
        xr = tl.load(
            x_b + rows[:, None] * stride_xn + dims[None, :], mask=row_ok[:, None] & dim_ok[None, :], other=0.0
        ).to(tl.float32)
        xp = tl.load(x_b + pick * stride_xn + dims, mask=dim_ok, other=0.0).to(tl.float32)
        dot += tl.sum(xr * xp[None, :], axis=1)
    inv_rows = tl.load(inv_ptr + b * n + rows, mask=row_ok, other=0.0)
    inv_pick = tl.load(inv_ptr + b * n + pick)
    sim = dot * inv_rows * inv_pick
    closest = tl.load(closest_ptr + b * n + rows, mask=row_ok, other=float("inf"))
    closest = tl.maximum(closest, sim)
    closest = tl.where(rows == pick, float("inf"), closest)  # never pick a row twice
    tl.store(closest_ptr + b * n + rows, closest, mask=row_ok)

    closest = tl.where(row_ok, closest, float("inf"))
    cur = (step % 2) * batch * CANDIDATES + b * CANDIDATES
    tl.store(cand_val_ptr + cur + pid, tl.min(closest, axis=0))
    tl.store(cand_idx_ptr + cur + pid, pid * BLOCK_N + tl.argmin(closest, axis=0, tie_break_left=True))


def greedy_farthest(x: torch.Tensor, inv: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Kernel version of :func:`vtprune.ops.diversity.greedy_farthest`.

    x: (B, N, D) any float dtype, inv: (B, N) fp32, first: (B,) long. Returns (B, k) long.
    """
    x = x.contiguous()
    b, n, d = x.shape
    block_n, block_d = pow2(n, hi=128), pow2(d, hi=128)
    num_blocks = triton.cdiv(n, block_n)
    candidates = pow2(num_blocks, lo=1)
    cand_val = torch.full((2, b, candidates), float("inf"), dtype=torch.float32, device=x.device)
    cand_idx = torch.zeros((2, b, candidates), dtype=torch.long, device=x.device)
    cand_val[0, :, 0] = 0.0  # the seed is the only candidate of "step 0"
    cand_idx[0, :, 0] = first
    closest = torch.full((b, n), -float("inf"), dtype=torch.float32, device=x.device)
    picks = torch.empty((b, k), dtype=torch.long, device=x.device)
    inv = inv.float().contiguous()
    for step in range(1, k):
        _greedy_step_kernel[(num_blocks, b)](
            x,
            inv,
            closest,
            cand_val,
            cand_idx,
            picks,
            step,
            n,
            d,
            num_blocks,
            x.stride(0),
            x.stride(1),
            b,
            k,
            BLOCK_N=block_n,
            BLOCK_D=block_d,
            CANDIDATES=candidates,
        )
    last = (k - 1) % 2
    winner = cand_val[last].argmin(dim=-1, keepdim=True)
    picks[:, k - 1] = cand_idx[last].gather(1, winner)[:, 0]
    return picks


def nearest_similarity(x: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Kernel version of :func:`vtprune.ops.diversity.nearest_similarity`: (B, N) fp32."""
    x = x.contiguous()
    b, n, d = x.shape
    out = torch.empty((b, n), dtype=torch.float32, device=x.device)
    block = 64
    _nearest_similarity_kernel[(triton.cdiv(n, block), b)](
        x,
        inv.float().contiguous(),
        out,
        n,
        d,
        x.stride(0),
        x.stride(1),
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=pow2(d, hi=32),
    )
    return out


def max_min_diversity(x: torch.Tensor, k: int) -> torch.Tensor:
    """x: (B, N, D) any float dtype, 1 <= k <= N. Returns (B, k) long in selection order."""
    inv = inverse_norms(x)
    first = nearest_similarity(x, inv).argmin(dim=-1)
    return greedy_farthest(x, inv, first, k)
