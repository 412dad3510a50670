"""CDPruner's math: the fast greedy DPP against the determinant rule written out, the relevance
against its formula, and the edge cases (no text, flat relevance, the kernel's rank used up)."""

import pytest
import torch
from references import naive_conditional_dpp, naive_instruction_relevance

from vtprune.ops import conditional_dpp, instruction_relevance


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("k", [1, 5, 12])
def test_the_fast_greedy_picks_the_largest_determinant_at_every_step(seed, k):
    torch.manual_seed(seed)
    x, quality = torch.randn(30, 16), torch.rand(30)
    picked = conditional_dpp(x, quality, k)
    assert picked.dtype == torch.long and len(set(picked.tolist())) == k
    assert torch.equal(picked.sort().values, naive_conditional_dpp(x, quality, k))


def test_picks_come_in_pick_order_the_most_relevant_first():
    torch.manual_seed(0)
    x, quality = torch.randn(20, 8), torch.rand(20)
    assert int(conditional_dpp(x, quality, 3)[0]) == int(quality.argmax())  # det of one token: q^2


def test_a_duplicate_token_is_never_picked_while_another_adds_volume():
    x = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    quality = torch.tensor([1.0, 0.99, 0.5, 0.4])
    assert conditional_dpp(x, quality, 3).tolist() == [0, 2, 3]


def test_once_the_rank_is_used_up_the_rest_are_the_most_relevant_left():
    # Rank 2: after two picks no token adds volume; the last picks follow quality, ties to the lowest index.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0], [2.0, 1.0]])
    quality = torch.tensor([1.0, 0.9, 0.5, 0.7, 0.5])
    assert conditional_dpp(x, quality, 5).tolist() == [0, 1, 3, 2, 4]


def test_k_is_checked():
    with pytest.raises(ValueError, match=r"k must be in \[0, 3\]"):
        conditional_dpp(torch.randn(3, 4), torch.ones(3), 4)
    with pytest.raises(ValueError, match=r"quality must have shape \(3,\)"):
        conditional_dpp(torch.randn(3, 4), torch.ones(4), 2)
    assert conditional_dpp(torch.randn(3, 4), torch.ones(3), 0).numel() == 0


@pytest.mark.parametrize("negate", [True, False])
def test_relevance_is_the_normalised_mean_cosine_with_the_text(negate):
    torch.manual_seed(1)
    x, text = torch.randn(25, 12), torch.randn(4, 12)
    expected = naive_instruction_relevance(x, text, negate)
    torch.testing.assert_close(instruction_relevance(x, text, negate=negate), expected.float())
    assert instruction_relevance(x, text, negate=negate).dtype == torch.float32


def test_without_text_or_with_flat_relevance_every_token_weighs_the_same():
    x = torch.randn(6, 4)
    for text in (None, torch.zeros(0, 4)):
        assert torch.equal(instruction_relevance(x, text), torch.ones(6))
    same = torch.ones(6, 4)
    assert torch.equal(instruction_relevance(same, torch.randn(2, 4)), torch.ones(6))
