"""Recycling in the LLM stage: at a drop point, groups of leaving tokens are averaged (weighted) into
recycled tokens standing at their anchor's place with the anchor's position. Equal to a decoder run by
hand, batched == per-sample, generate() without a cache repeats the choice, the stats name what each
recycled token stands for, and malformed reductions are refused."""

from dataclasses import dataclass

import pytest
import torch
from helpers import greedy
from references import reference_generate

import vtprune
from vtprune.pruners.base import PromptTokens, Reduction, top_k_sorted
from vtprune.testing import batch_inputs, make_prompt


@dataclass
class RecycleTheRest(vtprune.FastV):
    """FastV's choice of ``keep - 2`` tokens; the others recycled into two tokens (the first and second
    half of them in prompt order), weighted 1, 2, 3, ... along each half, anchored at each half's last."""

    def reduce(self, tokens: PromptTokens) -> Reduction:
        kept = top_k_sorted(tokens.attention, tokens.keep - 2)
        rest = torch.ones(len(tokens), dtype=torch.bool)
        rest[kept] = False
        halves = rest.nonzero().flatten().tensor_split(2)
        groups = tuple(h.flip(0) for h in halves)  # the anchor first: each half's last token
        weights = tuple(torch.arange(len(h), 0, -1).float() for h in halves)
        return Reduction(kept, groups, weights)


def recycled_at(stats, layer):
    """The recycling of a single drop: groups (anchor first) and the weights RecycleTheRest gives them."""
    return {layer: [(g, torch.arange(len(g), 0, -1).float()) for g in stats.merged[0]]}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_recycled_tokens_equal_a_hand_run_decoder(attn, model, eager_model, inputs):
    m = model if attn == "sdpa" else eager_model
    with vtprune.apply(m, RecycleTheRest(layer=2, keep=20)) as handle:
        out = greedy(m, inputs, n=6)
        stats = handle.last
    assert stats.kept_counts == [18] and stats.token_counts == [20] and len(stats.merged[0]) == 2
    behind = torch.cat([stats.kept[0], *stats.merged[0]]).sort().values
    assert torch.equal(behind, torch.arange(576))  # every visual token is kept or behind a recycled one
    drops = [(layer, kept[0]) for layer, kept in stats.drops]
    expected = reference_generate(m, inputs, drops, 6, recycled=recycled_at(stats, 2))
    assert torch.equal(out, expected)
    without = reference_generate(m, inputs, drops, 6)  # the anchors' own states instead of the means
    assert not torch.equal(out, without) or _logits_differ(m, inputs, stats)


def _logits_differ(m, inputs, stats):
    drops = [(layer, kept[0]) for layer, kept in stats.drops]
    a, b = [], []
    reference_generate(m, inputs, drops, 1, recycled=recycled_at(stats, 2), scores=a)
    reference_generate(m, inputs, drops, 1, scores=b)
    return not torch.allclose(a[0], b[0], atol=1e-4)


def test_batched_equals_per_sample_and_no_cache_repeats_the_choice(model):
    prompts = [make_prompt(model, [1, 5], [7, 8, 9]), make_prompt(model, [1, 5, 6, 13, 14, 15, 16], [7, 8])]
    batched = batch_inputs(model, prompts)
    with vtprune.apply(model, RecycleTheRest(layer=2, keep=20)) as handle:
        together = greedy(model, batched, n=5)
        merged = handle.last.merged
        with torch.no_grad():
            no_cache = model.generate(**batched, max_new_tokens=5, do_sample=False, use_cache=False)
        assert torch.equal(no_cache, together)
        for i, p in enumerate(prompts):
            single = {
                "input_ids": batched["input_ids"][i : i + 1, -len(p) :],
                "attention_mask": batched["attention_mask"][i : i + 1, -len(p) :],
                "pixel_values": batched["pixel_values"][i : i + 1],
            }
            alone = greedy(model, single, n=5)
            assert torch.equal(together[i, -5:], alone[0, -5:])
            assert all(torch.equal(a, b) for a, b in zip(merged[i], handle.last.merged[0]))


@dataclass
class Malformed(vtprune.FastV):
    bad: str = "overlap"

    def reduce(self, tokens: PromptTokens) -> Reduction:
        kept = torch.arange(4)
        if self.bad == "overlap":
            return Reduction(kept, (torch.tensor([3, 9]),))
        if self.bad == "too_many":
            return Reduction(kept, tuple(torch.tensor([j]) for j in range(10, 10 + tokens.keep)))
        return Reduction(kept, (torch.tensor([9, 10]),), (torch.ones(3),))


@pytest.mark.parametrize("bad", ["overlap", "too_many", "weights"])
def test_malformed_recycling_is_refused_and_the_model_left_as_it_was(model, inputs, bad):
    expected = greedy(model, inputs, n=3)
    with vtprune.apply(model, Malformed(layer=2, keep=8, bad=bad)):
        with pytest.raises(ValueError, match="recycled groups counted, disjoint"):
            greedy(model, inputs, n=3)
    assert torch.equal(greedy(model, inputs, n=3), expected)
