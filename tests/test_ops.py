"""The math in vtprune.ops and the sequence compaction, against plain references."""

import pytest
import torch
from test_reference import naive_max_min_diversity

from vtprune.core.compaction import Compaction
from vtprune.ops import attention_rows, max_min_diversity


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


def test_max_min_diversity_rejects_bad_arguments():
    with pytest.raises(ValueError, match="k must be >= 1"):
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
    torch.testing.assert_close(attention_rows(q, k, rows, key_mask=key_mask, scale=0.25).double(),
                               expected.mean(1), atol=1e-6, rtol=0)


def test_attention_rows_in_fp32_for_half_inputs():
    q, k = torch.randn(1, 4, 1, 8).bfloat16(), torch.randn(1, 4, 12, 8).bfloat16()
    out = attention_rows(q, k)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, attention_rows(q.float(), k.float()), atol=0, rtol=0)


def test_compaction_left_pads_and_restores():
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    comp = Compaction.from_keep(keep)
    assert comp.index.shape == (2, 4)
    assert comp.valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    assert comp.index[0, 1:].tolist() == [0, 2, 3] and comp.index[1].tolist() == [0, 1, 2, 3]
    assert comp.dropped.tolist() == [2, 1]
    x = torch.arange(10.0).reshape(2, 5, 1)
    short = comp.gather(x, fill=-1)
    assert short[..., 0].tolist() == [[-1, 0, 2, 3], [5, 6, 7, 8]]
    back = comp.scatter_into(torch.zeros_like(x), short * 10)
    assert back[..., 0].tolist() == [[0, 0, 20, 30, 0], [50, 60, 70, 80, 0]]
    assert Compaction.from_keep(torch.ones(2, 3, dtype=torch.bool)).is_identity
