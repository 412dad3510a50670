"""Kept indices against straightforward (slow) implementations of each published rule."""

import pytest
import torch
from references import (
    eager_cls_scores,
    fastv_reference_generate,
    fastv_reference_kept,
    image_features,
    naive_max_min_diversity,
)

import vtprune


@pytest.mark.parametrize("keep", [1, 16, 100])
def test_divprune_matches_naive_rule(model, inputs, keep):
    with vtprune.apply(model, "divprune", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    assert torch.equal(handle.last.kept[0], naive_max_min_diversity(image_features(model, inputs), keep))


@pytest.mark.parametrize("layers, expected_layers", [(None, [1]), ([0, 1, 2], [0, 1, 2]), ([-1], [2])])
def test_cls_rank_matches_eager_attention(eager_model, inputs, layers, expected_layers):
    # vision_feature_layer=-2 of a 3-layer tower is the output of encoder layer 1: the default.
    with vtprune.apply(eager_model, "cls", keep=50, layers=layers) as handle, torch.no_grad():
        eager_model(**inputs)
    scores = eager_cls_scores(eager_model, inputs, expected_layers)
    expected = scores.topk(50).indices.sort().values
    assert torch.equal(handle.last.kept[0], expected)


def test_cls_row_keeps_best_whole_rows(eager_model, inputs):
    with vtprune.apply(eager_model, "cls", keep=24 * 3 + 5, strategy="row") as handle, torch.no_grad():
        eager_model(**inputs)
    scores = eager_cls_scores(eager_model, inputs, [1]).reshape(24, 24)
    rows = scores.sum(1).argsort(descending=True)
    expected = [r * 24 + c for r in rows[:3].tolist() for c in range(24)]
    expected += [rows[3].item() * 24 + c for c in scores[rows[3]].topk(5).indices.tolist()]
    assert torch.equal(handle.last.kept[0], torch.tensor(sorted(expected)))


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_matches_eager_attention(model, eager_model, inputs, layer):
    expected = fastv_reference_kept(eager_model, inputs, layer, 64)
    for m in (model, eager_model):  # SDPA recomputes the rows; eager would have returned them
        with vtprune.apply(m, "fastv", keep=64, layer=layer) as handle, torch.no_grad():
            m(**inputs)
        assert torch.equal(handle.last.kept[0], expected)
        assert handle.last.layer_tokens[0] == [576] * layer + [64] * (4 - layer)


@pytest.mark.parametrize("layer", [1, 3])
def test_fastv_generation_matches_recompute_reference(model, eager_model, inputs, layer):
    for m in (model, eager_model):
        with vtprune.apply(m, "fastv", keep=32, layer=layer) as handle:
            with torch.no_grad():
                tokens = m.generate(**inputs, max_new_tokens=8, do_sample=False)
            kept = handle.last.kept[0]
        assert torch.equal(tokens, fastv_reference_generate(eager_model, inputs, kept, layer, 8))
