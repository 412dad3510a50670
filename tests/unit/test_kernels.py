"""Triton kernels against the torch reference, run on the CPU in Triton's interpreter."""

import os

import pytest
import torch

os.environ["TRITON_INTERPRET"] = "1"  # read by Triton when the kernel modules are first imported
pytest.importorskip("triton", reason="Triton is not installed; the kernel tests run in its CPU interpreter")

from references import sparse_sign_rows

from vtprune.ops import attention_rows, k_center, max_min_diversity, transition_variation

# Triton's CPU interpreter takes seconds per kernel launch: the full suite (and CI) runs these.
pytestmark = pytest.mark.slow

HALF = [torch.float16, torch.bfloat16]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# (B, N, D, k): N below, at and above the 128-row block, D not a multiple of the 128/32 blocks, k = N.
SELECTION_SHAPES = [(1, 1, 4, 1), (1, 7, 3, 7), (2, 300, 40, 50), (3, 129, 130, 20), (1, 64, 16, 64)]


@pytest.mark.parametrize("b, n, d, k", SELECTION_SHAPES)
def test_max_min_diversity_kernel_equals_torch(b, n, d, k):
    x = randn(b, n, d, seed=n)
    assert torch.equal(max_min_diversity(x, k, backend="triton"), max_min_diversity(x, k, backend="torch"))


@pytest.mark.parametrize("b, n, d, k", SELECTION_SHAPES)
def test_k_center_kernel_equals_torch(b, n, d, k):
    x = randn(b, n, d, seed=n + 1)
    first = torch.arange(b) % n
    for seed in (None, first):
        assert torch.equal(k_center(x, k, first=seed, backend="triton"), k_center(x, k, first=seed, backend="torch"))


@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_selection_kernels_on_ties(dtype):
    # Sparse sign rows have exact cosine similarities in j/64 steps: ties everywhere, decided by index.
    x = sparse_sign_rows(2, 160, 64, nonzero=16, seed=5).to(dtype)
    x[:, 50:60] = x[:, 40:50]  # exact duplicates too
    for op in (max_min_diversity, k_center):
        picks = op(x, 60, backend="triton")
        assert torch.equal(picks, op(x, 60, backend="torch"))
        assert all(row.unique().numel() == 60 for row in picks)


ATTENTION_CASES = [
    # (B, Hq, Hkv, R, L, D, causal, masked, per_head)
    (1, 4, 4, 1, 9, 8, True, False, False),
    (2, 8, 2, 3, 300, 24, True, True, False),  # GQA, L over two 128-key blocks, D not a power of two
    (2, 6, 3, 2, 130, 64, False, True, True),
    (1, 2, 1, 4, 257, 16, False, False, True),
]


@pytest.mark.parametrize("b, hq, hkv, r, length, d, causal, masked, per_head", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_attention_rows_kernel_equals_torch(b, hq, hkv, r, length, d, causal, masked, per_head, dtype):
    q, k = randn(b, hq, r, d, seed=1).to(dtype), randn(b, hkv, length, d, seed=2).to(dtype)
    rows = torch.arange(length - r, length) if causal else None
    if causal and r > 1:
        rows[0] = 0  # a row that sees one key only
    key_mask = None
    if masked:
        key_mask = torch.ones(b, length, dtype=torch.bool)
        key_mask[-1, : length // 3] = False  # left padding
    kwargs = {"key_mask": key_mask, "per_head": per_head}
    expected = attention_rows(q, k, rows, backend="torch", **kwargs)
    got = attention_rows(q, k, rows, backend="triton", **kwargs)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_attention_rows_kernel_fully_masked_row_is_zero():
    q, k = randn(1, 2, 1, 8), randn(1, 2, 20, 8, seed=1)
    key_mask = torch.zeros(1, 20, dtype=torch.bool)
    key_mask[0, 10:] = True
    out = attention_rows(q, k, torch.tensor([5]), key_mask=key_mask, backend="triton")
    assert torch.equal(out, torch.zeros(1, 1, 20))


@pytest.mark.parametrize("shape", [(1, 5, 8), (2, 77, 50), (3, 129, 300), (40, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF])
def test_transition_variation_kernel_equals_torch(shape, dtype):
    h_in, h_out = randn(*shape, seed=3).to(dtype), randn(*shape, seed=4).to(dtype)
    mask = torch.rand(shape[:-1], generator=torch.Generator().manual_seed(0)) > 0.2
    for m in (None, mask):
        expected = transition_variation(h_in, h_out, m, backend="torch")
        torch.testing.assert_close(transition_variation(h_in, h_out, m, backend="triton"), expected, atol=1e-5, rtol=0)
