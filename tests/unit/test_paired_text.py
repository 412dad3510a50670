"""The text each image comes with (CATP's alignment): the prompt's text after it up to the next image."""

import torch

from vtprune.core.layout import VisualLayout
from vtprune.core.paired_text import paired_text

IMAGE, VIDEO = 31, 30


def layout_of(ids, counts, token=IMAGE):
    return VisualLayout.from_placeholders(torch.tensor(ids), token, counts)


def test_each_image_gets_the_text_after_it_up_to_the_next_image():
    ids = [[1, 5, IMAGE, IMAGE, 7, 8, IMAGE, 9, 2, 10, IMAGE, IMAGE]]
    texts = paired_text(torch.tensor(ids), None, layout_of(ids, [2, 1, 2]), frozenset({1, 2}))
    assert [t.tolist() for t in texts] == [[4, 5], [7, 9], []]  # 2 is special; the last has no text after it


def test_images_side_by_side_share_the_text_after_them_and_padding_is_left_out():
    ids = [[0, 0, 1, IMAGE, IMAGE, IMAGE, 7, 8], [1, IMAGE, 6, IMAGE, IMAGE, 9, 9, 9]]
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    layout = layout_of(ids, [1, 2, 1, 2])
    texts = paired_text(torch.tensor(ids), mask, layout, frozenset())
    assert [t.tolist() for t in texts] == [[6, 7], [6, 7], [2], [5, 6, 7]]


def test_placeholders_of_every_kind_are_not_text():
    ids = [[1, IMAGE, 4, VIDEO, VIDEO, 5]]
    merged = VisualLayout.merge([layout_of(ids, [1]), layout_of(ids, [2], VIDEO)])
    texts = paired_text(torch.tensor(ids), None, merged, frozenset({1}))
    assert [t.tolist() for t in texts] == [[2], [5]]
