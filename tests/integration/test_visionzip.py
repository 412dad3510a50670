"""VisionZip: dominant tokens by CLS attention, the rest merged into contextual tokens by key similarity."""

import pytest
import torch
from families import FAMILIES

import vtprune


def reference(model, inputs, keep, contextual):
    """VisionZip's rule from an eager tower's own outputs: CLS attention and head-mean keys of the
    feature layer (encoder layer 1 of the tiny 3-layer tower), targets every len(rest)//c-th of the
    remaining tokens, each other token joining its most cosine-similar target (Python loop)."""
    tower = model.model.vision_tower
    layer = tower.vision_model.encoder.layers[1] if hasattr(tower, "vision_model") else tower.encoder.layers[1]
    with torch.no_grad():
        out = tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
        normed = layer.layer_norm1(out.hidden_states[1])
        keys = layer.self_attn.k_proj(normed)[0].reshape(577, 2, -1).mean(1)[1:]  # (576, head_dim), patches
    scores = out.attentions[1][0, :, 0, 1:].mean(0)
    dominant = scores.topk(keep - contextual).indices.sort().values
    rest = [i for i in range(576) if i not in set(dominant.tolist())]
    step = max(1, len(rest) // contextual)
    targets = rest[::step][:contextual]
    unit = keys / keys.norm(dim=-1, keepdim=True)
    groups = {t: [t] for t in targets}
    for i in rest:
        if i not in groups:
            similarity = [float(unit[i] @ unit[t]) for t in targets]
            groups[targets[similarity.index(max(similarity))]].append(i)
    return dominant, [torch.tensor(groups[t]) for t in targets]


def test_visionzip_follows_the_rule(eager_model, inputs):
    with vtprune.apply(eager_model, "visionzip", keep=64) as handle, torch.no_grad():
        eager_model(**inputs)
    dominant, groups = reference(eager_model, inputs, 64, 10)
    assert torch.equal(handle.last.kept[0], dominant)
    assert len(handle.last.merged[0]) == 10
    for got, expected in zip(handle.last.merged[0], groups):
        assert got.tolist() == expected.tolist()


def test_merged_groups_partition_the_dropped_tokens(model, inputs):
    with vtprune.apply(model, "visionzip", keep=64) as handle, torch.no_grad():
        model(**inputs)
    kept, groups = handle.last.kept[0], handle.last.merged[0]
    every = torch.cat([kept, *groups]).sort().values
    assert torch.equal(every, torch.arange(576))  # each token once: kept, or in one group
    assert handle.last.layer_tokens[0] == [64] * 4


def test_the_language_model_receives_kept_tokens_then_group_means(model, inputs):
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    seen = {}

    def capture(module, args, kwargs):
        seen["embeds"] = kwargs["inputs_embeds"].clone()

    hook = model.model.language_model.register_forward_pre_hook(capture, with_kwargs=True)
    try:
        with vtprune.apply(model, "visionzip", keep=64) as handle, torch.no_grad():
            model(**inputs)
    finally:
        hook.remove()
    kept, groups = handle.last.kept[0], handle.last.merged[0]
    image = seen["embeds"][0, 4:68]  # 4 text tokens before the image, 64 image tokens
    assert torch.equal(image[:54], features[kept])
    torch.testing.assert_close(image[54:], torch.stack([features[g].mean(0) for g in groups]), atol=1e-6, rtol=0)


@pytest.mark.parametrize("keep, split", [(64, (54, 10)), (128, (108, 20)), (192, (162, 30)), (3, (3, 0))])
def test_the_contextual_share_scales_with_keep(model, inputs, keep, split):
    with vtprune.apply(model, "visionzip", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    assert (handle.last.kept_counts[0], len(handle.last.merged[0])) == split


def test_without_contextual_tokens_it_is_cls(model, inputs):
    kept = []
    for name, options in (("visionzip", {"contextual": 0.0}), ("cls", {})):
        with vtprune.apply(model, name, keep=40, **options) as handle, torch.no_grad():
            model(**inputs)
        kept.append(handle.last.kept[0])
    assert torch.equal(kept[0], kept[1])


def test_towers_without_cls_get_the_substitute_with_a_warning():
    import vtprune.pruners.cls as cls_module

    family = next(f for f in FAMILIES if f.name == "llava_onevision")
    model = family.model()
    cls_module._WARNED.discard(("visionzip", "SiglipVisionModel"))
    with pytest.warns(UserWarning, match="'visionzip' pruner: SiglipVisionModel has no CLS token"):
        handle = vtprune.apply(model, "visionzip", keep=20)
    handle.remove()
