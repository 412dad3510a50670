"""Where each sample's visual tokens sit (vtprune.core.layout.VisualLayout), located from token ids."""

import pytest
import torch

from vtprune.core.layout import VisualLayout

IMG, VID = 9, 8


def _ids():
    # sample 0: text, image (3 tokens), text, image (2 tokens); sample 1: padding, image (3 tokens), text
    return torch.tensor([[1, IMG, IMG, IMG, 2, IMG, IMG, 3], [0, 0, 0, 1, IMG, IMG, IMG, 2]])


def test_placeholders_are_assigned_to_images_in_reading_order_over_the_batch():
    layout = VisualLayout.from_placeholders(_ids(), IMG, [3, 2, 3])
    assert [[s.tolist() for s in spans] for spans in layout.spans] == [[[1, 2, 3], [5, 6]], [[4, 5, 6]]]
    assert layout.items == [[0, 1], [2]]
    assert layout.visual_counts() == [5, 3] and layout.has_images and layout.length == 8


def test_tokens_that_are_never_pruned_are_left_out_of_the_spans():
    layout = VisualLayout.from_placeholders(
        _ids(), IMG, [3, 2, 3], prunable=[torch.tensor([0, 2]), torch.arange(2), torch.arange(3)]
    )
    assert layout.spans[0][0].tolist() == [1, 3]


def test_a_count_mismatch_and_an_image_split_across_samples_are_refused():
    with pytest.raises(ValueError, match="the prompt has 8 image placeholder tokens .* give 7 features"):
        VisualLayout.from_placeholders(_ids(), IMG, [3, 2, 2])
    with pytest.raises(ValueError, match="split across two samples"):
        VisualLayout.from_placeholders(_ids(), IMG, [3, 3, 2])


def test_images_and_videos_merge_in_prompt_order():
    ids = torch.tensor([[1, VID, VID, 2, IMG, IMG, 3]])
    images = VisualLayout.from_placeholders(ids, IMG, [2])
    videos = VisualLayout.from_placeholders(ids, VID, [2], kind="video")
    merged = VisualLayout.merge([images, videos])
    assert [s.tolist() for s in merged.spans[0]] == [[1, 2], [4, 5]]
    assert merged.items == [[1, 0]]  # the video (item 1, after the images) comes first in the prompt


def test_keep_mask_and_per_sample_indices():
    layout = VisualLayout.from_placeholders(_ids(), IMG, [3, 2, 3])
    kept = layout.per_sample([torch.tensor([0, 2]), torch.tensor([1]), torch.tensor([1])])
    mask = layout.keep_mask(kept, "cpu")
    assert mask.tolist()[0] == [True, True, False, True, True, False, True, True]
    assert mask.tolist()[1] == [True] * 4 + [False, True, False, True]
    assert [k.tolist() for k in layout.sample_kept(kept)] == [[0, 2, 4], [1]]
    groups = layout.per_sample([(), (torch.tensor([0, 1]),), (torch.tensor([0, 2]),)])
    assert [[g.tolist() for g in s] for s in layout.sample_groups(groups)] == [[[3, 4]], [[0, 2]]]
