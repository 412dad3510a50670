"""MustDrop's encoding-stage merge (``mustdrop_merge``): on a timm ViT and in LLaVA-1.5's CLIP tower it
equals the model run by hand with the reference code's window pooling after the first block (its
threshold and batch rule, or vtprune's keep); the rows and columns past the last whole window never
merge; bad options are refused. The family matrix (test_families.py) covers the VLM families."""

import pytest
import torch
from helpers import fused_eager_and_alone, logits, prompt_with_image_tokens_at, timm_images, timm_vit
from references import mustdrop_windows

import vtprune
from vtprune.ops import window_matching, window_scores

timm = pytest.importorskip("timm")


def vit(**options):
    return timm_vit(depth=4, **options)


def images():
    return timm_images(4)


def pooled(x, **rule):
    """x (B, 1 + P, D) after the first block, merged by the reference's pooling (plain window means)."""
    merge = mustdrop_windows(x, **rule)
    return merge(x, "sum") / merge(torch.ones_like(x[..., :1]), "sum")


def hand_run_vit(model, x, **rule):
    x = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    x = pooled(x, **rule)
    for block in model.blocks[1:]:
        x = block(x)
    return model.forward_head(model.norm(x))


def first_block_scores(model, x):
    with torch.no_grad():
        h = model.blocks[0](model.norm_pre(model._pos_embed(model.patch_embed(x))))
    return window_scores(h[:, 1:], (8, 8), 3)


@torch.no_grad()
def test_the_papers_threshold_and_batch_rule_equal_the_reference():
    model, x = vit(), images()
    scores = first_block_scores(model, x)  # (4 images, 4 windows)
    ordered = scores.flatten().sort().values
    threshold = float(ordered[7:9].mean())  # between two scores: no image sits on it
    counts = (scores >= threshold).sum(-1)
    assert counts.min() < counts.max()  # the batch rule matters here
    with vtprune.apply(model, vtprune.MustDropMerge(threshold=threshold)) as handle:
        out = model(x)
        alone = [model(x[i : i + 1]) for i in range(len(x))]
    assert handle.last.token_counts == [64 - 8 * int(counts[-1])]  # the last call: the last image alone
    torch.testing.assert_close(out, hand_run_vit(model, x, threshold=threshold), rtol=1e-4, atol=1e-5)
    for i in range(len(x)):  # alone, each image merges all its windows above the threshold
        expected = hand_run_vit(model, x[i : i + 1], threshold=threshold)
        torch.testing.assert_close(alone[i], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("keep", [48, 37, 32])
@torch.no_grad()
def test_keep_merges_the_best_windows_then_part_of_the_next(keep):
    model, x = vit(), images()
    with vtprune.apply(model, vtprune.MustDropMerge(keep=keep)) as handle:
        out = model(x)
    torch.testing.assert_close(out, hand_run_vit(model, x, merges=64 - keep), rtol=1e-4, atol=1e-5)
    assert handle.last.token_counts == [keep] * 4 and handle.last.layer_tokens[0] == [64, keep, keep, keep]
    for kept, merged in zip(handle.last.kept, handle.last.merged):
        assert sorted(torch.cat([kept, *merged]).tolist()) == list(range(64))
        beyond = {r * 8 + c for r in range(8) for c in range(8) if r >= 6 or c >= 6}
        assert beyond <= set(kept.tolist())  # rows and columns past the last whole window stay alone
        whole, partial = divmod(64 - keep, 8)
        assert sorted(g.numel() for g in merged) == [partial + 1] * bool(partial) + [9] * whole


@torch.no_grad()
def test_fused_equals_eager_batched_equals_alone_and_identities():
    model, x = vit(reg_tokens=2), images()
    expected = model(x)
    for identity in (vtprune.MustDropMerge(keep=1.0), vtprune.MustDropMerge(threshold=1.0)):
        with vtprune.apply(model, identity):
            assert torch.equal(model(x), expected)
    with vtprune.apply(model, vtprune.MustDropMerge(keep=0.6, layers=[1])) as handle:
        fused, eager, alone = fused_eager_and_alone(model, x)
    torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(alone, eager, rtol=1e-4, atol=1e-5)
    assert handle.last.layer_tokens[0] == [64, 64, 38, 38]  # merged after block 1's output


def test_window_matching_merges_whole_windows_into_their_last_token():
    torch.manual_seed(0)
    metric = torch.randn(2, 1 + 36, 8)
    matching = window_matching(metric, r=10, protected=1, grid=(6, 6), k=3)
    scores = window_scores(metric[:, 1:], (6, 6), 3)
    for b in range(2):
        best = int(scores[b].argmax())
        corner = (best // 2) * 18 + (best % 2) * 3  # the best window's top-left patch
        window = [1 + corner + 6 * i + j for i in range(3) for j in range(3)]
        assert sorted(matching.merged[b, :8].tolist()) == window[:-1]
        assert matching.into[b, :8].tolist() == [window[-1]] * 8  # the bottom-right patch
        assert matching.into[b, 8:].unique().numel() == 1  # the partial window: one target
    assert matching.kept.shape == (2, 27) and (matching.kept[:, :1] == 0).all()


def test_bad_options_are_refused_before_the_model_is_touched():
    model = vit()
    cases = [
        (lambda: vtprune.MustDropMerge(keep=16, threshold=0.8), "give keep .* or threshold .*, not both"),
        (lambda: vtprune.MustDropMerge(threshold=2), r"threshold must be a number in \[-1, 1\]"),
        (lambda: vtprune.MustDropMerge(window=1), "window must be an int >= 2"),
        (lambda: vtprune.MustDropMerge(layers=[0, 2]), "layers must name one block"),
        (lambda: vtprune.apply(model, vtprune.MustDropMerge(keep=20)), "leave at least 32 of 64 patches"),
        (lambda: vtprune.apply(vit(img_size=(64, 48)), "mustdrop_merge"), "square grid"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert vtprune.handle_of(model) is None and all("forward" not in b.__dict__ for b in model.blocks)


def merged_clip_features(model, pixel_values, **rule):
    """LLaVA-1.5's image features with MustDrop's pooling after the first CLIP layer, by hand; and per
    patch the token it ends in."""
    tower = model.model.vision_tower
    layers = tower.encoder.layers[: model.config.vision_feature_layer % len(tower.encoder.layers) + 1]
    x = layers[0](tower.pre_layrnorm(tower.embeddings(pixel_values)), None)
    n = x.shape[1]
    merge = mustdrop_windows(x, **rule)
    source = merge(torch.eye(n).expand(x.shape[0], n, n), "amax")
    x = merge(x, "sum") / merge(torch.ones_like(x[..., :1]), "sum")
    for layer in layers[1:]:
        x = layer(x, None)
    token = source.argmax(1)
    full = x.gather(1, token[..., None].expand(-1, -1, x.shape[-1]))
    return model.model.multi_modal_projector(full[:, 1:]), token[:, 1:]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("rule", [{"merges": 373}, {"threshold": 0.0}], ids=["keep203", "threshold"])
@torch.no_grad()
def test_llava_equals_a_hand_run_tower_and_a_prompt_with_one_token_per_merged_token(attn, rule):
    from families import FAMILIES

    family = next(f for f in FAMILIES if f.name == "llava")
    model = family.model(attn)
    inputs, _ = family.batch(model, [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)])
    pruner = vtprune.MustDropMerge(**({"keep": 576 - rule["merges"]} if "merges" in rule else rule))
    with vtprune.apply(model, pruner) as handle:
        pruned = logits(model, inputs)
    features, token = merged_clip_features(model, inputs["pixel_values"], **rule)
    firsts = torch.tensor(sorted({int((token[0] == t).nonzero()[0]) for t in token[0].unique()}))
    assert handle.last.token_counts == [firsts.numel()] and firsts.numel() < 576
    expected = prompt_with_image_tokens_at(model, inputs, firsts, features[0, firsts])
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
