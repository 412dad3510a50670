"""LLaVA-NeXT specifics: base and crops as parts, newline tokens fixed, CLS attention per tower input."""

import pytest
import torch
from families import FAMILIES, assert_processor_batches_prune_like_single_prompts, packed_sources
from helpers import PIPELINE, apply, greedy, logits

import vtprune
from vtprune.core.image_parts import split_budget
from vtprune.pruners.uniform import grid_subsample
from vtprune.testing import IMAGE_TOKEN_ID, image_token_counts

NEXT = next(f for f in FAMILIES if f.name == "llava_next")
ONE_IMAGE = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)]
WITH_NEWLINES = [f for f in FAMILIES if f.name in ("llava_next", "llava_onevision")]  # fixed image tokens


def test_cls_scores_each_part_with_its_own_tower_input():
    model = NEXT.model("eager")
    inputs, _ = NEXT.batch(model, ONE_IMAGE)
    assert inputs["image_sizes"][0].tolist() == [60, 200]
    sources = packed_sources(model, inputs, n_inputs=3)  # 60x200 -> base + 1x2 crops
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


def test_global_crop_budget_splits_the_crops_share_by_the_base_images_attention():
    model = NEXT.model("eager")
    images = NEXT.images(1, first=2)
    assert images["image_sizes"][0].tolist() == [200, 200]  # 2 x 2 crops, nothing unpadded
    ids = [1, 5] + [IMAGE_TOKEN_ID] * image_token_counts(model, **images)[0] + [6, 7]
    inputs = {"input_ids": torch.tensor([ids]), **images}
    sources = [s for s in packed_sources(model, inputs, n_inputs=5) if s is not None]
    crop_of = torch.tensor([s[0] - 1 for s in sources])  # -1 for base tokens
    with torch.no_grad():
        attentions = model.model.vision_tower(images["pixel_values"][0, :5], output_attentions=True).attentions
    base_scores = attentions[1][0, :, 0, 1:].mean(0)  # (64,) the base image's CLS row
    # GlobalCom²: sum over each crop's region of the 8 x 8 base grid, softmax at temperature 10
    region = torch.tensor([(i // 4) * 2 + (j // 4) for i in range(8) for j in range(8)])
    sums = torch.zeros(4, dtype=torch.float64).index_add_(0, region, base_scores.double())
    p = torch.softmax((sums - sums.max()) / 10.0, dim=0)
    sizes = [int((crop_of == c).sum()) for c in range(4)]
    weights = [float(1 + p[c] - p.mean()) * sizes[c] for c in range(4)]
    keep = 40
    k_base, k_crops = split_budget(keep, [64, sum(sizes)])
    expected = split_budget(k_crops, sizes, weights)
    for name in ("divprune", "cls", "uniform"):
        with vtprune.apply(model, name, keep=keep, crop_budget="global") as handle, torch.no_grad():
            model(**inputs)
        kept = handle.last.kept[0]
        assert int((crop_of[kept] == -1).sum()) == k_base
        assert [int((crop_of[kept] == c).sum()) for c in range(4)] == expected, name
    # uniform (the last run) scores each crop on its own 8 x 8 grid
    position = torch.tensor([s[1] for s in sources])
    for c in range(4):
        mine = kept[crop_of[kept] == c]
        assert sorted(position[mine].tolist()) == sorted(grid_subsample(8, 8, expected[c]).tolist())


def test_crop_budget_is_validated_and_has_no_effect_without_crops():
    with pytest.raises(ValueError, match="crop_budget must be one of"):
        vtprune.DivPrune(keep=8, crop_budget="per_crop")
    llava = next(f for f in FAMILIES if f.name == "llava")
    model = llava.model()
    inputs, _ = llava.batch(model, [([1], [2], 1)])
    kept = []
    for budget in ("proportional", "global"):
        with vtprune.apply(model, "divprune", keep=20, crop_budget=budget) as handle, torch.no_grad():
            model(**inputs)
        kept.append(handle.last.kept[0])
    assert torch.equal(kept[0], kept[1])


def test_the_processors_batches_prune_like_single_prompts():
    """LLaVA-NeXT's own processor (anyres crops, padded pixel_values, image_sizes) end to end."""
    from PIL import Image

    from vtprune.testing import tiny_llava_next, tiny_llava_next_processor

    processor, vocab = tiny_llava_next_processor()
    model = tiny_llava_next(vocab=len(vocab))
    model.config.image_token_id = vocab["<image>"]
    texts = ["<image> what is in the image ?", "a red <image> what is the circle ?"]
    pictures = [Image.new("RGB", (200, 60), (200, 30, 30)), Image.new("RGB", (100, 150), (20, 30, 200))]
    batch, kept = assert_processor_batches_prune_like_single_prompts(model, processor, texts, pictures)
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], return_dict=True
        ).pooler_output
    patches = [int((~(f == model.model.image_newline).all(-1)).sum()) for f in packed]
    for counts in kept.values():
        assert counts == [round(0.25 * n) for n in patches]  # newline tokens are not counted


@pytest.mark.parametrize(
    "family", [NEXT, next(f for f in FAMILIES if f.name == "llava_onevision")], ids=lambda f: f.name
)
def test_global_crop_budget_keeps_all_and_batches_like_single_prompts(family):
    model = family.model()
    samples = [([1, 5, 6], [], 0), ([1, 5], [7, 8], 2), ([1, 4, 4, 6], [9, 10, 11], 1)]
    batch, singles = family.batch(model, samples)
    base = greedy(model, batch)
    with vtprune.apply(model, "divprune", keep=1.0, crop_budget="global"):
        assert torch.equal(greedy(model, batch), base)
    with vtprune.apply(model, "divprune", keep=0.2, crop_budget="global") as handle:
        together = greedy(model, batch)
        kept_together = handle.last.kept
        for i, single in enumerate(singles):
            assert torch.equal(together[i, -8:], greedy(model, single)[0, -8:]), f"sample {i} differs"
            if i:
                assert torch.equal(kept_together[i], handle.last.kept[0])


@pytest.mark.filterwarnings("ignore:the '.*' pruner.*has no CLS token")  # the substitute score
@pytest.mark.parametrize("name", ["fastv", "pdrop", "transprune", "adaptive", "todre", PIPELINE])
@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.name in ("llava_next", "llava_onevision")], ids=lambda f: f.name
)
def test_llm_stage_refuses_a_prompt_whose_image_ends_with_a_newline_token(family, name):
    # The image's last placeholder is a newline token, never pruned: the prompt still ends with the image.
    model = family.model()
    inputs, _ = family.batch(model, [([1, 5, 6, 7], [], 1)])
    assert int(inputs["input_ids"][0, -1]) == IMAGE_TOKEN_ID
    expected = logits(model, inputs)
    with apply(model, name, keep=16):
        with pytest.raises(ValueError, match="ends with image tokens"):
            logits(model, inputs)
    assert torch.equal(logits(model, inputs), expected)
