"""SparseVLM against its rule computed from an eager model's returned attention maps and hidden states
(text raters from the decoder's input embeddings, their attention at the layer before the drop, the
tokens recycled by density-peak clustering); a generation against a decoder run by hand; the
reference's settings; option checks. The family matrix runs it everywhere."""

import pytest
import torch
from references import naive_density_peaks, reference_generate

import vtprune
from vtprune.core.tokens import ModelInfo
from vtprune.pruners.sparsevlm import recycled_count, selected_count
from vtprune.testing import IMAGE_TOKEN_ID


def first_drop_reference(eager_model, inputs, layer, total):
    """SparseVLM's first drop (before ``layer``) by hand: (selected, recycled groups best-rated first)."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True, output_hidden_states=True)
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    text = torch.arange(int(image[-1]) + 1, ids.numel())
    embeddings = out.hidden_states[0][0]
    relevance = torch.softmax(embeddings[image] @ embeddings[text].T, dim=-1).mean(0)
    raters = text[relevance > relevance.mean()]
    scores = out.attentions[layer - 1][0].mean(0)[raters][:, image].mean(0)
    k = selected_count(total, image.numel())
    selected = scores.topk(k).indices.sort().values
    rest = torch.ones(image.numel(), dtype=torch.bool)
    rest[selected] = False
    pool = rest.nonzero().flatten()
    best = pool[scores[pool].argsort(descending=True, stable=True)][: int(0.3 * pool.numel()) + 1]
    clusters = recycled_count(pool.numel())
    assignment, _ = naive_density_peaks(out.hidden_states[layer][0][image[best]], clusters)
    return selected, [best[assignment == c] for c in range(clusters)]


@torch.no_grad()
def test_the_first_drop_equals_its_rule_on_eager_attention_and_hidden_states(eager_model, inputs):
    with vtprune.apply(eager_model, "sparsevlm", schedule=[(2, 100)]) as handle:
        eager_model(**inputs)
    stats = handle.last
    selected, groups = first_drop_reference(eager_model, inputs, layer=2, total=100)
    assert torch.equal(stats.kept[0], selected)
    assert sorted(g.tolist() for g in stats.merged[0]) == sorted(g.tolist() for g in groups)
    assert stats.token_counts == [100] and len(groups) == recycled_count(576 - selected.numel())


def test_generation_equals_a_hand_run_decoder_with_the_recycled_tokens(model, inputs):
    with vtprune.apply(model, "sparsevlm", schedule=[(2, 60)]) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    stats = handle.last
    drops = [(layer, kept[0]) for layer, kept in stats.drops]
    recycled = {2: [(g, None) for g in stats.merged[0]]}
    assert torch.equal(out, reference_generate(model, inputs, drops, 6, recycled=recycled))


@pytest.mark.parametrize("retain, counts", [(64, [82, 32, 18]), (128, [312, 117, 39]), (192, [309, 204, 113])])
def test_the_reference_settings_leave_its_counts(retain, counts):
    # LLaVA-1.5's decoder (32 layers) and image (576 tokens)
    llava = ModelInfo(
        num_decoder_layers=32, num_tower_layers=24, tower_has_cls=True, tower_name="clip", feature_layers=(22,)
    )
    points = vtprune.SparseVLM(retain=retain).drop_points(llava, 576)
    assert [(p.layer, p.keep) for p in points] == list(zip([3, 7, 16], counts))


def test_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        vtprune.SparseVLM(keep=64, retain=64)
    with pytest.raises(ValueError, match="retain must be one of"):
        vtprune.SparseVLM(retain=100)
    with pytest.raises(ValueError, match="recycle must be True or False"):
        vtprune.SparseVLM(recycle="yes")
