"""LLaVA-OneVision specifics: a tower without CLS, resampled crops grids, multi-image samples."""

import pytest
import torch
from families import FAMILIES, packed_sources
from helpers import greedy, logits

import vtprune
from vtprune.core.image_parts import split_budget
from vtprune.testing import IMAGE_TOKEN_ID, image_token_counts

OV = next(f for f in FAMILIES if f.name == "llava_onevision")
pytestmark = pytest.mark.filterwarnings("ignore:the 'cls' pruner")


def one_image(model, index: int) -> dict:
    images = OV.images(1, first=index)
    ids = [1, 5] + [IMAGE_TOKEN_ID] * image_token_counts(model, **images)[0] + [6, 7]
    return {"input_ids": torch.tensor([ids]), **images}


def test_cls_scores_the_attention_each_patch_receives_per_tower_input():
    model = OV.model("eager")
    inputs = one_image(model, 1)
    assert inputs["image_sizes"][0].tolist() == [60, 200]  # not resampled: packed tokens match patches
    sources = packed_sources(model, inputs, n_inputs=3)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values"][0, :3], output_attentions=True).attentions
    received = attentions[-1].mean(1).mean(1)  # (inputs, 64): the last layer is the feature layer
    patches = [s for s in sources if s is not None]
    base = [j for j, s in enumerate(patches) if s[0] == 0]
    crops = [j for j, s in enumerate(patches) if s[0] > 0]
    expected = []
    for part, k in zip((base, crops), split_budget(20, [len(base), len(crops)])):
        scores = torch.stack([received[patches[j]] for j in part])
        expected += [part[i] for i in scores.topk(k).indices.tolist()]
    with vtprune.apply(model, "cls", keep=20) as handle, torch.no_grad():
        model(**inputs)
    assert handle.last.kept[0].tolist() == sorted(expected)


def test_a_resampled_crops_grid_is_one_grid_with_a_newline_per_row():
    model = OV.model()
    inputs = one_image(model, 0)
    assert inputs["image_sizes"][0].tolist() == [200, 200]  # 2x2 crops: 16 x 16, resampled to 11 x 11
    n_tokens = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert n_tokens == 64 + 11 * 11 + 11
    with vtprune.apply(model, "uniform", keep=36) as handle, torch.no_grad():
        model(**inputs)
    kept = handle.last.kept[0]
    base, crops = kept[kept < 64], kept[kept >= 64] - 64
    assert base.numel() == 12 and crops.numel() == 24  # 36 split 64 : 121
    assert all(0 <= int(i) < 121 for i in crops)


def multi_image_batch(model):
    """Sample 0: two images (no crops, batch_num_images=2); sample 1: one image with crops."""
    images = OV.images(3)
    counts_alone = image_token_counts(model, **images)
    few = image_token_counts(model, **images, batch_num_images=torch.tensor([2, 1]))
    assert few[:2] == [65, 65] and few[2] == counts_alone[2]  # 8 x 8 + one newline each
    p0 = [1, 5] + [IMAGE_TOKEN_ID] * 65 + [7] + [IMAGE_TOKEN_ID] * 65 + [8, 9]
    p1 = [1, 4, 4, 4] + [IMAGE_TOKEN_ID] * few[2] + [9, 10, 11]
    longest = max(len(p0), len(p1))
    ids = torch.zeros(2, longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate((p0, p1)):
        ids[i, longest - len(p) :], mask[i, longest - len(p) :] = torch.tensor(p), 1
    batch = {"input_ids": ids, "attention_mask": mask, **images, "batch_num_images": torch.tensor([2, 1])}
    singles = [
        {
            "input_ids": torch.tensor([p0]),
            "pixel_values": images["pixel_values"][:2],
            "image_sizes": images["image_sizes"][:2],
            "batch_num_images": torch.tensor([2]),
        },
        {
            "input_ids": torch.tensor([p1]),
            "pixel_values": images["pixel_values"][2:],
            "image_sizes": images["image_sizes"][2:],
            "batch_num_images": torch.tensor([1]),
        },
    ]
    return batch, singles


@pytest.mark.parametrize("name", ["divprune", "cls", "fastv", "pdrop"])
def test_multi_image_samples_prune_each_image_and_batch_like_single_samples(name):
    model = OV.model()
    batch, singles = multi_image_batch(model)
    with vtprune.apply(model, name, keep=0.25) as handle:
        together = greedy(model, batch)
        kept_together = handle.last.kept
        for i, single in enumerate(singles):
            alone = greedy(model, single)
            assert torch.equal(together[i, -8:], alone[0, -8:]), f"sample {i} differs"
            assert torch.equal(kept_together[i], handle.last.kept[0])
    # sample 0: two 64-patch images, each its own budget of 16; their newlines are never counted
    assert all(int(i) < 128 for i in kept_together[0])
    if vtprune.registry.pruner_class(name).stage == "vision":
        assert int((kept_together[0] < 64).sum()) == 16 and kept_together[0].numel() == 32


def test_keep_all_with_multi_image_samples_is_the_unpruned_model():
    model = OV.model()
    batch, _ = multi_image_batch(model)
    base = logits(model, batch)
    with vtprune.apply(model, "divprune", keep=1.0):
        torch.testing.assert_close(logits(model, batch), base, atol=1e-5, rtol=0)
