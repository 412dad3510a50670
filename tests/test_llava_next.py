"""LLaVA-NeXT specifics: base and crops as parts, newline tokens fixed, CLS attention per tower input."""

import pytest
import torch
from families import FAMILIES

import vtprune
from vtprune.core.image_parts import split_budget

NEXT = next(f for f in FAMILIES if f.name == "llava_next")
ONE_IMAGE = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)]


def packed_sources(model, inputs):
    """For each packed token of image 0: (tower input, patch position) it came from, or None for a
    newline; found by matching the packed features against each tower input's projected patches."""
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output[0]
        n_inputs = 1 + 2  # 60x200 -> base + 1x2 crops
        hidden = model.model.vision_tower(inputs["pixel_values"][0, :n_inputs], output_hidden_states=True)
        projected = model.model.multi_modal_projector(hidden.hidden_states[-2][:, 1:])  # (inputs, 64, D)
    flat = projected.reshape(-1, projected.shape[-1])
    sources = []
    for token in packed:
        match = (flat == token).all(-1).nonzero().flatten()
        sources.append(None if match.numel() == 0 else divmod(int(match[0]), projected.shape[1]))
    return sources


def test_cls_scores_each_part_with_its_own_tower_input():
    model = NEXT.model("eager")
    inputs, _ = NEXT.batch(model, ONE_IMAGE)
    assert inputs["image_sizes"][0].tolist() == [60, 200]
    sources = packed_sources(model, inputs)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"][0, :3], output_attentions=True).attentions
    scores = attentions[1][:, :, 0, 1:].mean(1)  # (inputs, 64): vision_feature_layer=-2 is encoder layer 1
    patches = [(i, s) for i, s in enumerate(sources) if s is not None]  # prunable tokens in prompt order
    base = [j for j, (_, s) in enumerate(patches) if s[0] == 0]
    crops = [j for j, (_, s) in enumerate(patches) if s[0] > 0]
    assert len(sources) - len(patches) == 4  # one newline per row of the unpadded 4 x 16 crops grid
    keep = 20
    k_base, k_crops = split_budget(keep, [len(base), len(crops)])
    expected = []
    for part, k in ((base, k_base), (crops, k_crops)):
        part_scores = torch.stack([scores[patches[j][1]] for j in part])
        expected += [part[i] for i in part_scores.topk(k).indices.tolist()]
    with vtprune.apply(model, "cls", keep=keep) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last.kept[0].tolist() == sorted(expected)


@pytest.mark.parametrize("name", ["uniform", "divprune", "random"])
def test_the_budget_is_shared_by_base_and_crops_in_proportion(name):
    model = NEXT.model()
    inputs, _ = NEXT.batch(model, [([1], [2], 1)])
    with vtprune.apply(model, name, keep=30) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.last.kept[0]
    # 60x200: 64 base tokens, then 64 crop tokens (4 x 16 after unpadding); 128 prunable
    assert int((kept < 64).sum()) == 15 and int((kept >= 64).sum()) == 15


def test_uniform_spreads_over_each_grid():
    model = NEXT.model()
    inputs, _ = NEXT.batch(model, [([1], [2], 1)])
    with vtprune.apply(model, "uniform", keep=32) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.last.kept[0]
    base, crops = kept[kept < 64], kept[kept >= 64] - 64
    assert base.tolist() == [r * 8 + c for r in (1, 3, 5, 7) for c in (1, 3, 5, 7)]  # 4 x 4 of 8 x 8
    # the 4 x 16 crops grid (after unpadding), subsampled 2 x 8 with its aspect ratio
    assert crops.tolist() == [r * 16 + c for r in (1, 3) for c in range(1, 16, 2)]
