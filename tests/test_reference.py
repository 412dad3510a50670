"""Kept indices against straightforward (slow) implementations of each published rule."""

import pytest
import torch

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID


def image_features(model, inputs):
    with torch.no_grad():
        return model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]


def naive_max_min_diversity(x, k):
    """DivPrune's rule with the full distance matrix and a Python loop."""
    x = x.double()
    u = x / x.norm(dim=1, keepdim=True)
    dist = 1 - u @ u.T
    n = x.shape[0]
    nearest = [min((dist[i, j].item() for j in range(n) if j != i), default=float("inf")) for i in range(n)]
    chosen = [max(range(n), key=lambda i: (nearest[i], -i))]
    while len(chosen) < k:
        closest = dist[:, chosen].min(dim=1).values.tolist()
        rest = [i for i in range(n) if i not in chosen]
        chosen.append(max(rest, key=lambda i: (closest[i], -i)))
    return torch.tensor(sorted(chosen))


@pytest.mark.parametrize("keep", [1, 16, 100])
def test_divprune_matches_naive_rule(model, inputs, keep):
    with vtprune.apply(model, "divprune", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    assert torch.equal(handle.last.kept[0], naive_max_min_diversity(image_features(model, inputs), keep))


def eager_cls_scores(model, inputs, layers):
    """Head-mean CLS -> patch attention read off an eager tower's returned attention maps."""
    tower = model.model.vision_tower
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True)
    return sum(out.attentions[i][0, :, 0, 1:].mean(0) for i in layers)


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


def fastv_reference_kept(eager_model, inputs, layer, keep):
    """FastV's rule on an eager model's returned attention: last token, layer K-1, head mean."""
    with torch.no_grad():
        out = eager_model(**inputs, output_attentions=True)
    image = (inputs["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    scores = out.attentions[layer - 1][0, :, -1, image].mean(0)
    return scores.topk(keep).indices.sort().values


@pytest.mark.parametrize("layer", [1, 2, 3])
def test_fastv_matches_eager_attention(model, eager_model, inputs, layer):
    expected = fastv_reference_kept(eager_model, inputs, layer, 64)
    for m in (model, eager_model):  # SDPA recomputes the rows; eager would have returned them
        with vtprune.apply(m, "fastv", keep=64, layer=layer) as handle, torch.no_grad():
            m(**inputs)
        assert torch.equal(handle.last.kept[0], expected)
        assert handle.last.layer_tokens[0] == [576] * layer + [64] * (4 - layer)


def reference_generate(model, inputs, drops, n, features=None):
    """Greedy decoding with no cache, recomputing everything each step: from each drop point's layer
    on, only that drop's kept image tokens (``drops``: [(layer, kept indices), ...], kept as in
    ``PruneStats``) plus all text and generated tokens go on, at their original positions.
    ``features``: the image tokens to place in the prompt (default: the image's features)."""
    lm = model.model.language_model
    ids = inputs["input_ids"]
    image = (ids[0] == IMAGE_TOKEN_ID).nonzero().flatten()
    features = image_features(model, inputs) if features is None else features
    drops = dict(drops)
    for _ in range(n):
        length = ids.shape[1]
        with torch.no_grad():
            h = model.get_input_embeddings()(ids)
            h[0, image] = features
            positions = torch.arange(length)
            cos, sin = lm.rotary_emb(h, positions[None])
            for i, decoder_layer in enumerate(lm.layers):
                if i in drops:
                    keep = torch.ones(length, dtype=torch.bool)
                    dropped = torch.ones(image.numel(), dtype=torch.bool)
                    dropped[drops[i]] = False
                    keep[image[dropped]] = False
                    keep = keep[positions]  # of the tokens still here
                    h, cos, sin, positions = h[:, keep], cos[:, keep], sin[:, keep], positions[keep]
                allowed = positions[None, :] <= positions[:, None]
                mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
                h = decoder_layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
            next_token = model.lm_head(lm.norm(h[:, -1])).argmax(-1)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
    return ids


def fastv_reference_generate(model, inputs, kept, layer, n):
    return reference_generate(model, inputs, [(layer, kept)], n)


@pytest.mark.parametrize("layer", [1, 3])
def test_fastv_generation_matches_recompute_reference(model, eager_model, inputs, layer):
    for m in (model, eager_model):
        with vtprune.apply(m, "fastv", keep=32, layer=layer) as handle:
            with torch.no_grad():
                tokens = m.generate(**inputs, max_new_tokens=8, do_sample=False)
            kept = handle.last.kept[0]
        assert torch.equal(tokens, fastv_reference_generate(eager_model, inputs, kept, layer, 8))
