"""One image's token layout (vtprune.core.image_parts): parts, fixed tokens, index spaces, budgets."""

import torch

from vtprune.core.image_parts import ImagePart, ImageParts, crop_weights, split_budget


def test_split_budget_caps_parts_and_follows_weights():
    assert split_budget(10, [4, 100]) == [0, 10]
    assert split_budget(10, [50, 50]) == [5, 5]
    assert split_budget(10, [50, 50], weights=[3.0, 1.0]) == [8, 2]  # 7.5 / 2.5: ties to the earlier
    assert split_budget(10, [2, 50], weights=[10.0, 1.0]) == [2, 8]  # a full part passes the rest on
    assert split_budget(500, [2, 3]) == [2, 3]


def _next_like():
    """Six tokens: a 2 x 1 base grid, then two crop tokens and a newline, a crop token and a newline."""
    return ImageParts(7, (ImagePart(torch.tensor([0, 1]), (2, 1)), ImagePart(torch.tensor([2, 3, 5]), None)))


def test_prunable_fixed_and_token_positions_of_a_layout_with_fixed_tokens():
    parts = _next_like()
    assert parts.prunable.tolist() == [0, 1, 2, 3, 5]
    assert parts.fixed.tolist() == [4, 6]
    assert parts.grid is None  # two parts: no single grid
    # prunable indices 1 and 3 (tokens 1 and 3) stay, with the fixed newlines
    assert parts.token_positions(torch.tensor([1, 3])).tolist() == [1, 3, 4, 6]


def test_after_keep_is_one_part_of_the_kept_tokens_with_fixed_tokens_still_fixed():
    after = _next_like().after_keep(torch.tensor([1, 3, 4]))
    assert after.n_tokens == 5  # tokens 1, 3, 4(fixed), 5, 6(fixed)
    assert after.prunable.tolist() == [0, 1, 3] and after.fixed.tolist() == [2, 4]


def test_single_keeps_a_grid_only_when_it_covers_the_tokens():
    assert ImageParts.single(6, (2, 3)).grid == (2, 3)
    assert ImageParts.single(7, (2, 3)).grid is None
    assert ImageParts.single(4, None).token_positions(torch.tensor([0, 2])).tolist() == [0, 2]


def test_crop_weights_favour_the_crop_whose_region_holds_the_attention():
    base_scores = torch.tensor([0.0, 0.0, 5.0, 5.0])
    regions = torch.tensor([0, 0, 1, 1])  # the first two base tokens lie in crop 0, the others in crop 1
    weights = crop_weights(base_scores, regions, [10, 10])
    assert weights[1] > weights[0] and abs(sum(weights) - 20) < 1e-9  # 1 + p - mean(p) averages to 1
    assert crop_weights(torch.zeros(4), regions, [10, 30]) == [10.0, 30.0]  # no preference: sizes


def test_tower_tokens_enter_once_at_their_first_patch_and_restricted_keeps_parts_and_signals():
    # 3 base tokens, then a crops grid with a fixed (newline) token at position 5
    parts = ImageParts(
        7,
        (ImagePart(torch.tensor([0, 1, 2])), ImagePart(torch.tensor([3, 4, 6]))),
        cls_attention=torch.arange(7.0),
        tower_ids=torch.tensor([4, 9, 4, 7, 8, -1, 7]),
    )
    firsts, members = parts.tower_tokens()  # prunable indices: positions 0 1 2 3 4 6
    assert firsts.tolist() == [0, 1, 3, 4] and [m.tolist() for m in members] == [[0, 2], [1], [3, 5], [4]]
    view = parts.restricted(torch.tensor([0, 1, 3, 4, 5]))
    assert view.n_tokens == 5 and view.fixed.tolist() == [4] and view.prunable.tolist() == [0, 1, 2, 3]
    assert [p.index.tolist() for p in view.parts] == [[0, 1], [2, 3]] and view.cls_attention.tolist() == [0, 1, 3, 4, 5]
