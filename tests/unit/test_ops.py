"""The math in vtprune.ops against plain references."""

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from references import full_matrix_max_min_diversity, naive_k_center, naive_max_min_diversity, sparse_sign_rows

from vtprune.ops import attention_rows, k_center, max_min_diversity, resolve_backend, transition_variation
from vtprune.timing import peak_memory_available


@pytest.mark.parametrize("n, d, k", [(1, 4, 1), (7, 3, 7), (50, 16, 10), (300, 32, 40)])
def test_max_min_diversity_matches_naive(n, d, k):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    picks = max_min_diversity(x, k, block=64)
    assert picks.unique().numel() == k
    assert torch.equal(picks.sort().values, naive_max_min_diversity(x, k))


def test_max_min_diversity_batched_equals_per_item():
    x = torch.randn(3, 120, 8, generator=torch.Generator().manual_seed(0))
    batched = max_min_diversity(x, 15, block=32)
    for i in range(3):
        assert torch.equal(batched[i], max_min_diversity(x[i], 15))


def test_max_min_diversity_never_repeats_on_duplicates():
    x = torch.ones(10, 4)
    x[3] = -1
    picks = max_min_diversity(x, 6)
    assert picks.unique().numel() == 6
    assert set(picks[:2].tolist()) == {0, 3}  # ties go to the lowest index


def test_max_min_diversity_scores_low_precision_in_fp32():
    x = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    for dtype in (torch.float16, torch.bfloat16):
        low = x.to(dtype)
        assert torch.equal(max_min_diversity(low, 20), max_min_diversity(low.float(), 20))


@pytest.mark.slow
def test_max_min_diversity_equals_full_matrix_reference_at_video_scale():
    # N = 11,520 (20 frames of 576 tokens), k = N / 9, with many exact ties.
    x = sparse_sign_rows(1, 11_520, 1024, nonzero=256, seed=0)[0]
    assert torch.equal(max_min_diversity(x, 1280), full_matrix_max_min_diversity(x, 1280))


_MEASURE_DIVERSITY = """
import torch
from vtprune.ops import max_min_diversity
from vtprune.timing import peak_memory_growth
x = torch.randn(11_520, 1024, generator=torch.Generator().manual_seed(0))
max_min_diversity(x, 2)  # warm up the allocator and BLAS buffers outside the measurement
print(peak_memory_growth(lambda: max_min_diversity(x, 64)))
"""


@pytest.mark.slow
@pytest.mark.skipif(not peak_memory_available(), reason="peak memory is measured through Linux's /proc")
def test_max_min_diversity_never_holds_the_distance_matrix():
    # In a fresh process: in a long test session the heap's state left by earlier tests moves the
    # measured peak by tens of MiB.
    run = subprocess.run([sys.executable, "-c", _MEASURE_DIVERSITY], capture_output=True, text=True, check=True)
    growth, n = int(run.stdout.split()[-1]), 11_520
    # The N x N fp32 matrix alone is 506 MiB; the blocked first pick holds a 16 MiB slice of it.
    assert growth < n * n * 4 / 10, f"peak memory grew by {growth / 2**20:.0f} MiB"


@pytest.mark.parametrize("n, d, k, first", [(1, 3, 1, 0), (40, 8, 40, 7), (300, 32, 30, 123)])
def test_k_center_matches_naive(n, d, k, first):
    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    assert torch.equal(k_center(x, k, first=first), naive_k_center(x, k, first))
    assert torch.equal(k_center(x, k, first=torch.tensor(first)), naive_k_center(x, k, first))


def test_k_center_default_seed_is_the_row_closest_to_the_mean():
    x = torch.randn(2, 50, 8, generator=torch.Generator().manual_seed(0))
    picks = k_center(x, 5)
    for i in range(2):
        central = int(F.cosine_similarity(x[i], x[i].mean(0, keepdim=True)).argmax())
        assert picks[i, 0] == central
        assert torch.equal(picks[i], k_center(x[i], 5, first=central))


def test_k_center_and_max_min_diversity_differ_only_in_the_seed():
    x = torch.randn(3, 80, 16, generator=torch.Generator().manual_seed(2))
    mmd = max_min_diversity(x, 12)
    assert torch.equal(k_center(x, 12, first=mmd[:, 0]), mmd)


def test_k_center_rejects_bad_seed():
    with pytest.raises(ValueError, match=r"first must index a row in 0\.\.9"):
        k_center(torch.randn(10, 2), 3, first=10)
    with pytest.raises(ValueError, match="first must be"):
        k_center(torch.randn(10, 2), 3, first=1.5)
    with pytest.raises(ValueError, match="B=2"):
        k_center(torch.randn(2, 10, 2), 3, first=torch.tensor([1, 2, 3]))


def transprune_reference(h_in, h_out):
    """TransPrune's per-sub-layer weight as its authors compute it for one sample (L, D)."""
    ratio = h_out.norm(dim=-1) / h_in.norm(dim=-1)
    change = torch.exp(1 - F.cosine_similarity(h_in, h_out, dim=-1))
    return ratio * change / change.sum()


def test_transition_variation_matches_transprune_formula():
    g = torch.Generator().manual_seed(0)
    h_in, h_out = torch.randn(2, 30, 16, generator=g), torch.randn(2, 30, 16, generator=g)
    got = transition_variation(h_in, h_out)
    for i in range(2):
        torch.testing.assert_close(got[i], transprune_reference(h_in[i], h_out[i]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(transition_variation(h_in[0], h_out[0]), got[0], atol=0, rtol=0)


def test_transition_variation_ignores_masked_tokens():
    g = torch.Generator().manual_seed(1)
    h_in, h_out = torch.randn(2, 12, 8, generator=g), torch.randn(2, 12, 8, generator=g)
    mask = torch.ones(2, 12, dtype=torch.bool)
    mask[1, :4] = False  # left padding
    got = transition_variation(h_in, h_out, mask)
    assert torch.equal(got[1, :4], torch.zeros(4))
    torch.testing.assert_close(got[1, 4:], transprune_reference(h_in[1, 4:], h_out[1, 4:]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(got[0], transition_variation(h_in[0], h_out[0]), atol=0, rtol=0)
    with pytest.raises(ValueError, match="one shape"):
        transition_variation(h_in, h_out[:, :5])
    with pytest.raises(ValueError, match="mask must be"):
        transition_variation(h_in, h_out, mask[:, :5])


def test_backend_resolution(monkeypatch):
    x = torch.randn(4, 2)
    assert resolve_backend("auto", x) == "torch"  # CPU tensors never pick a kernel by themselves
    assert resolve_backend("torch", x) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr("vtprune.ops._backend.triton_available", lambda: True)
    on_gpu = SimpleNamespace(is_cuda=True, device="cuda:0")
    assert resolve_backend("auto", on_gpu) == "triton"
    assert resolve_backend("auto", on_gpu, x) == "torch"  # mixed devices: the reference handles errors
    with pytest.raises(ValueError, match="needs CUDA tensors.*TRITON_INTERPRET=1"):
        max_min_diversity(x, 2, backend="triton")
    monkeypatch.setattr("vtprune.ops._backend.triton_available", lambda: False)
    with pytest.raises(ImportError, match="needs the `triton` package"):
        attention_rows(torch.randn(1, 1, 1, 2), torch.randn(1, 1, 3, 2), backend="triton")
    assert resolve_backend("auto", on_gpu) == "torch"


@pytest.mark.slow  # a fresh Python process per case: seconds each
def test_ops_work_without_triton():
    script = """
import sys
sys.modules["triton"] = None  # as if Triton were not installed
import torch
from vtprune.ops import k_center, max_min_diversity, transition_variation, triton_available
assert not triton_available()
x = torch.randn(50, 8)
assert max_min_diversity(x, 5).shape == (5,) and k_center(x, 5).shape == (5,)
assert transition_variation(x, x + 1).shape == (50,)
try:
    max_min_diversity(x, 5, backend="triton")
except ImportError as error:
    print(error)
"""
    out = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "needs the `triton` package" in out.stdout


def test_max_min_diversity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be an int >= 1"):
        max_min_diversity(torch.randn(4, 2), 0)
    with pytest.raises(ValueError, match=r"\(N, D\) or \(B, N, D\)"):
        max_min_diversity(torch.randn(4), 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        max_min_diversity(torch.randn(4, 2), 1, backend="cuda")


def reference_attention(q, k, rows, key_mask, scale):
    hq, hkv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(hq // hkv, dim=1)
    logits = (q.double() @ k.double().transpose(-1, -2)) * scale
    length = k.shape[2]
    if rows is not None:
        logits = logits.masked_fill(torch.arange(length)[None, :] > rows[:, None], float("-inf"))
    if key_mask is not None:
        logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    return logits.softmax(-1)


@pytest.mark.parametrize("causal", [True, False])
def test_attention_rows_matches_softmax_reference(causal):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 8, 3, 16, generator=g), torch.randn(2, 2, 30, 16, generator=g)
    rows = torch.tensor([5, 17, 29]) if causal else None
    key_mask = torch.ones(2, 30, dtype=torch.bool)
    key_mask[1, :4] = False
    expected = reference_attention(q, k, rows, key_mask, 0.25)
    per_head = attention_rows(q, k, rows, key_mask=key_mask, scale=0.25, per_head=True)
    assert per_head.dtype == torch.float32
    torch.testing.assert_close(per_head.double(), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(
        attention_rows(q, k, rows, key_mask=key_mask, scale=0.25).double(), expected.mean(1), atol=1e-6, rtol=0
    )


def test_attention_rows_in_fp32_for_half_inputs():
    q, k = torch.randn(1, 4, 1, 8).bfloat16(), torch.randn(1, 4, 12, 8).bfloat16()
    out = attention_rows(q, k)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_rows(q.float(), k.float()), atol=0, rtol=0)


def test_transition_variation_of_known_changes():
    h_in = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0]])
    doubled = transition_variation(h_in, 2 * h_in)  # same direction: equal softmax shares, ratio 2
    torch.testing.assert_close(doubled, torch.full((3,), 2 / 3))
    flipped = torch.stack([h_in[0], h_in[1], -h_in[2]])  # only the last token turns around
    weights = transition_variation(h_in, flipped)
    share = torch.tensor([1.0, 1.0, torch.e**2]) / (2 + torch.e**2)  # softmax of 1 - cos = 0, 0, 2
    torch.testing.assert_close(weights, share)


@pytest.mark.parametrize("n, d, clusters", [(1, 4, 1), (12, 3, 2), (40, 16, 5), (83, 32, 9)])
def test_density_peak_clusters_match_naive_loops(n, d, clusters):
    from references import naive_density_peaks

    from vtprune.ops import density_peak_clusters

    x = torch.randn(n, d, generator=torch.Generator().manual_seed(n))
    assignment, centres = density_peak_clusters(x, clusters)
    expected_assignment, expected_centres = naive_density_peaks(x, clusters)
    assert torch.equal(centres, expected_centres) and torch.equal(assignment, expected_assignment)
    assert torch.equal(assignment.unique(), torch.arange(clusters))  # no cluster is empty: each holds its centre


def test_patch_entropy_matches_a_histogram_per_patch():
    from references import naive_patch_entropy

    from vtprune.ops import patch_entropy

    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 28, 42, generator=g) * 300 - 20  # out-of-range values clamp
    rgb[:, :, :14, :14] = 100.0  # a flat patch: entropy 0
    got = patch_entropy(rgb, 14)
    assert got.shape == (2, 6) and float(got[0, 0]) == pytest.approx(0.0, abs=1e-6)
    for b in range(2):
        torch.testing.assert_close(got[b], naive_patch_entropy(rgb[b], 14).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 14"):
        patch_entropy(rgb[..., :20], 14)


def test_global_token_attention_averages_the_rows_of_tokens_that_receive_most():
    from vtprune.ops import global_token_attention

    a = torch.softmax(torch.randn(6, 6, generator=torch.Generator().manual_seed(1)), dim=-1)
    received = a.mean(0)
    for threshold in (0.0, 1.0, 1.2):
        chosen = [j for j in range(6) if received[j] > threshold * received.mean()]
        expected = a[chosen].mean(0)
        torch.testing.assert_close(global_token_attention(a, threshold), expected)
    top = int(received.argmax())  # none above the threshold: the one receiving most stands alone
    torch.testing.assert_close(global_token_attention(a, 100.0), a[top])


def test_causal_attention_rank_matches_a_loop_over_heads_with_shared_keys():
    from vtprune.ops import causal_attention_rank

    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 4, 9, 8, generator=g), torch.randn(2, 2, 9, 8, generator=g)
    got = causal_attention_rank(q, k, scale=0.5, iterations=5)
    for b in range(2):
        scores = []
        for h in range(4):
            logits = (q[b, h] @ k[b, h // 2].T * 0.5).masked_fill(
                torch.ones(9, 9, dtype=torch.bool).triu(1), -torch.inf
            )
            m = logits.softmax(-1)
            s = torch.full((9,), 1 / 9)
            for _ in range(5):
                s = s @ m
            scores.append(s)
        torch.testing.assert_close(got[b], torch.stack(scores).square().mean(0).sqrt())


@pytest.mark.parametrize("weight", [0.0, 0.7, 50.0])
def test_facility_location_matches_the_greedy_rule_written_out(weight):
    from references import naive_facility_location

    from vtprune.ops import facility_location, rescaled_cosine

    g = torch.Generator().manual_seed(6)  # no two gains within 3e-3 of each other at any step: fp32 keeps the order
    x, text = torch.randn(40, 16, generator=g), torch.randn(3, 16, generator=g)
    bonus = weight * rescaled_cosine(x, text.mean(0, keepdim=True))[:, 0]
    picked = facility_location(x, 12, bonus)
    assert torch.equal(picked.sort().values, naive_facility_location(x, 12, text, weight))
    assert picked.unique().numel() == 12
    assert torch.equal(facility_location(x, 40).sort().values, torch.arange(40))
    with pytest.raises(ValueError, match=r"k must be in \[0, 40\]"):
        facility_location(x, 41)
