"""AIM: its merge after the tower against the reference's bipartite merges (the next layer's keys,
plain means, rounds in a row) fed to a hand-shortened prompt; its PageRank pruning against the rule
computed head by head from the decoder's hidden states, at a first and a later drop; a generation
against a hand-run decoder down to no visual tokens; the paper's scheduler; option checks. The family
matrix runs it everywhere it is supported."""

import pytest
import torch
from helpers import prompt_with_image_tokens_at
from references import aim_merge, naive_flow, reference_generate

import vtprune
from vtprune.core.tokens import ModelInfo
from vtprune.pruners.aim import linear_points
from vtprune.testing import IMAGE_TOKEN_ID


def merged_features(model, pixel_values, rs):
    """LLaVA-1.5's image tokens after AIM's merge, by hand: the merged tokens in their first patch's
    order, and the patches behind each."""
    tower = model.model.vision_tower
    hidden = tower(pixel_values, output_hidden_states=True).hidden_states
    feature = model.config.vision_feature_layer % len(tower.encoder.layers)  # the layer read: 1 of 3
    x = hidden[feature + 1][0]
    following = tower.encoder.layers[feature + 1]
    keys = following.self_attn.k_proj(following.layer_norm1(x))
    merged, groups = aim_merge(keys[1:], x[1:], rs)  # the patches, without CLS
    order = sorted(range(len(groups)), key=lambda t: groups[t][0])
    features = model.model.multi_modal_projector(merged[order])
    return features, [groups[t] for t in order]


@torch.no_grad()
def test_the_merge_equals_the_references_rounds_fed_to_a_shortened_prompt(model, inputs):
    with vtprune.apply(model, vtprune.AIMMerge()) as handle:  # 576 -> 288 -> 252, as the reference
        pruned = model(**inputs).logits
    features, groups = merged_features(model, inputs["pixel_values"], [288, 36])
    assert len(groups) == 252 and handle.last.token_counts == [252]
    assert sorted(g.tolist() for g in handle.last.merged[0]) == sorted(g for g in groups if len(g) > 1)
    expected = prompt_with_image_tokens_at(model, inputs, torch.tensor([g[0] for g in groups]), features)
    torch.testing.assert_close(pruned, expected, rtol=1e-4, atol=1e-4)


def flows_at(model, inputs, layer, present=None):
    """AIM's importance of the image tokens (or of those in ``present``) at decoder ``layer``, from the
    hidden states the model returns (restored to full length where tokens were dropped)."""
    out = model(**inputs, output_hidden_states=True)
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    stays = torch.ones(ids.numel(), dtype=torch.bool)
    if present is not None:
        stays[image] = False
        stays[image[present]] = True
    positions = stays.nonzero().flatten()
    lm = model.model.language_model
    cos, sin = lm.rotary_emb(out.hidden_states[layer], positions[None])
    flow = naive_flow(lm.layers[layer], out.hidden_states[layer][0, positions], cos, sin)
    return flow[torch.isin(positions, image)]


@torch.no_grad()
def test_the_drops_keep_the_tokens_of_highest_pagerank_at_the_layer_before(model, inputs):
    with vtprune.apply(model, vtprune.AIMPrune(schedule=[(1, 300), (3, 100)])) as handle:
        first = flows_at(model, inputs, 0)
        second = flows_at(model, inputs, 2, present=handle.last.drops[0][1][0])
    (_, kept_first), (_, kept_second) = handle.last.drops
    assert torch.equal(kept_first[0], first.topk(300).indices.sort().values)
    assert torch.equal(kept_second[0], kept_first[0][second.topk(100).indices.sort().values])


def test_generation_equals_a_hand_run_decoder_down_to_no_visual_tokens(model, inputs):
    with vtprune.apply(model, vtprune.AIMPrune(start=0.25, stop=0.75)) as handle, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    drops = [(layer, kept[0]) for layer, kept in handle.last.drops]
    assert [(layer, kept.numel()) for layer, kept in drops] == [(2, 288), (3, 0)]
    assert torch.equal(out, reference_generate(model, inputs, drops, 5))


def test_the_papers_scheduler_on_llava_1_5_and_keep_as_a_mean_per_layer():
    llava = ModelInfo(
        num_decoder_layers=32, num_tower_layers=24, tower_has_cls=True, tower_name="clip", feature_layers=(22,)
    )
    points = vtprune.AIMPrune(start=13 / 32, stop=21 / 32).drop_points(llava, 252)
    assert [(p.layer, p.keep) for p in points] == [
        (14, 220), (15, 189), (16, 157), (17, 126), (18, 94), (19, 63), (20, 31), (21, 0)
    ]  # fmt: skip
    for keep in (64, 137, 0.25):
        points = vtprune.AIMPrune(keep=keep).drop_points(llava, 252)
        target = keep if isinstance(keep, int) else keep * 252
        counts = [p.keep for p in points]
        assert abs(sum(linear_count(points, j, 252) for j in range(32)) / 32 - target) < 4
        assert counts == sorted(counts, reverse=True) and counts[-1] == 0
    assert vtprune.AIMPrune(keep=1.0).drop_points(llava, 252) == []
    assert linear_points(252, 32, 13, 21) == vtprune.AIMPrune(start=13 / 32, stop=21 / 32).drop_points(llava, 252)


def linear_count(points, layer, n):
    return min([p.keep for p in points if p.layer <= layer], default=n)


@torch.no_grad()
def test_keep_all_is_the_identity_and_the_default_merges_then_prunes(model, inputs):
    expected = model(**inputs).logits
    with vtprune.apply(model, "aim", keep=1.0) as handle:
        assert torch.equal(model(**inputs).logits, expected)
    assert handle.last.token_counts == [576]
    with vtprune.apply(model, "aim") as handle:
        model(**inputs)
    assert handle.last.layer_tokens[0] == [252, 4, 0, 0]  # a mean of 64 over the 4 layers


def test_options_are_checked():
    cases = [
        (lambda: vtprune.AIM(keep=64, start=0.4, stop=0.6), "not both"),
        (lambda: vtprune.AIM(start=0.4), "needs both start and stop"),
        (lambda: vtprune.AIM(start=0.6, stop=0.4), "start must come before stop"),
        (lambda: vtprune.AIM(start=-0.1, stop=0.4), r"start must be a number in \[0, 1\]"),
        (lambda: vtprune.AIM(merge=0), r"merge must be a fraction in \(0, 1\]"),
        (lambda: vtprune.AIMMerge(layers=[1]), "layers is not an option"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
