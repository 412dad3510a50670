"""MustDrop's prefill filter against its rule computed from an eager model's returned attention maps
(the instruction's attention at the layer before the drop, the tower's CLS attention at its last
layer for the key set); the three stages together against a hand-run decoder; defaults and option
checks. Its tower merge is tested in test_mustdrop_merge.py, its cache in test_decode_stage.py; the
family matrix runs it everywhere it is supported."""

import math

import pytest
import torch
from references import eager_cls_scores, reference_generate

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID


def instruction_scores(eager_model, inputs, layer):
    """Per image token: its share of the instruction's attention (head mean, summed over the
    instruction tokens) and the most any one instruction token gives it, at decoder ``layer``."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True)
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    rows = torch.arange(int(image[-1]) + 1, ids.numel())
    a = out.attentions[layer][0].mean(0)[rows][:, image]  # (instruction tokens, image tokens)
    g = a.sum(0)
    return g / g.sum(), a.amax(0)


def key_set(eager_model, inputs, ratio=0.08):
    scores = eager_cls_scores(eager_model, inputs, [eager_model.config.vision_config.num_hidden_layers - 1])
    key = torch.zeros(scores.numel(), dtype=torch.bool)
    key[scores.topk(math.ceil(ratio * scores.numel())).indices] = True
    return key


@torch.no_grad()
def test_the_paper_rule_drops_what_both_thresholds_reject_and_keeps_the_key_set(eager_model, inputs):
    share, peak = instruction_scores(eager_model, inputs, layer=0)  # the first drop is before layer 1
    key = key_set(eager_model, inputs)
    individual = float(peak.quantile(0.9))
    expected = ((share >= 1 / 576) | (peak >= individual) | key).nonzero().flatten()
    options = dict(merge=1.0, global_threshold=1 / 576, individual_threshold=individual)
    with vtprune.apply(eager_model, "mustdrop", **options) as handle:
        eager_model(**inputs)
    layer, kept = handle.last.drops[1]  # drops[0]: the tokens leaving the tower, all of them here
    assert layer == 1 and torch.equal(kept[0], expected)
    assert int(key.sum()) < expected.numel() < 576


@torch.no_grad()
def test_with_keep_the_key_set_comes_first_then_both_thresholds_scaled_together(eager_model, inputs):
    share, peak = instruction_scores(eager_model, inputs, layer=0)
    key = key_set(eager_model, inputs)
    with vtprune.apply(eager_model, "mustdrop", keep=0.5, merge=1.0) as handle:
        eager_model(**inputs)
    _, kept = handle.last.drops[1]
    k = kept[0].numel()
    score = torch.maximum(share / 0.011, peak / 0.01)
    rest = torch.where(key, -1.0, score).topk(k - int(key.sum())).indices
    expected = torch.cat([key.nonzero().flatten(), rest]).sort().values
    assert torch.equal(kept[0], expected) and int(key.sum()) < k < 576


def test_the_three_stages_equal_a_hand_run_decoder(model, inputs):
    with vtprune.apply(model, "mustdrop", keep=0.5, merge=1.0) as handle:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        stats = handle.last
    drops = [(layer, kept[0]) for layer, kept in stats.drops]
    first = drops[1][0]
    final = stats.kept[0]
    held = {layer: final for layer in range(first, model.config.text_config.num_hidden_layers)}
    assert torch.equal(out, reference_generate(model, inputs, drops, 5, held=held))
    assert [layer for layer, _ in drops] == [0, 1, 2, 3]


def test_the_default_merges_a_quarter_of_the_patches_in_the_tower(model, inputs):
    with vtprune.apply(model, "mustdrop") as handle, torch.no_grad():
        model(**inputs)
    entering = handle.last.layer_tokens[0][0]
    assert entering == 576 - round(0.24 * 576) and handle.last.token_counts[0] < entering
    with vtprune.apply(model, "mustdrop", keep=1.0) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last.layer_tokens == [[576] * 4]


def test_options_are_checked():
    with pytest.raises(ValueError, match="not both"):
        vtprune.MustDrop(keep=64, global_threshold=0.01, individual_threshold=0.01)
    with pytest.raises(ValueError, match="needs both"):
        vtprune.MustDrop(global_threshold=0.01)
    with pytest.raises(ValueError, match="merge must be a fraction"):
        vtprune.MustDrop(merge=0)
    with pytest.raises(ValueError, match="merge .* or merge_threshold, not both"):
        vtprune.MustDrop(merge=0.5, merge_threshold=0.8)
    with pytest.raises(ValueError, match="key_ratio"):
        vtprune.MustDrop(key_ratio=2)
    with pytest.raises(ValueError, match="individual_threshold must be"):
        vtprune.MustDrop(global_threshold=0.01, individual_threshold=-1)
