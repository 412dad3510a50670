"""The prompt with dropped tokens removed, and decode steps mapped onto its cache (vtprune.core.shortening)."""

import pytest
import torch

from vtprune.core.compaction import Compaction
from vtprune.core.shortening import IGNORE_INDEX, DecodeTranslation, shorten_prompt

IDS = torch.tensor([[5, 9, 9, 9, 6], [0, 5, 9, 9, 6]])
MASK = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
KEEP = torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 0, 1]], dtype=torch.bool)  # one image token dropped each


def test_the_shortened_prompt_is_the_prompt_written_without_the_dropped_tokens():
    comp = Compaction.from_keep(KEEP)
    positions = (MASK.cumsum(1) - 1).clamp_min(0)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 2, 3, 4]])
    short = shorten_prompt(comp, IDS, MASK, positions, labels, pad_token_id=0)
    assert short["input_ids"].tolist() == [[5, 9, 9, 6], [0, 5, 9, 6]]
    assert short["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 1, 1, 1]]
    assert short["labels"].tolist() == [[-100, 1, 3, 4], [-100, -100, 2, 4]]
    # positions close up over the dropped token: what a prompt of fewer image tokens would have
    assert short["position_ids"].tolist() == [[0, 1, 2, 3], [0, 0, 1, 2]]


def test_uneven_drops_left_pad_the_shorter_sample():
    keep = torch.tensor([[1, 1, 0, 0, 1], [1, 1, 1, 0, 1]], dtype=torch.bool)
    short = shorten_prompt(Compaction.from_keep(keep), IDS, None, None, None, pad_token_id=7)
    assert short["input_ids"].tolist() == [[7, 5, 9, 6], [0, 5, 9, 6]]
    assert short["attention_mask"].tolist() == [[0, 1, 1, 1], [1, 1, 1, 1]]  # a mask appears for the padding
    assert short["labels"] is None and short["position_ids"] is None
    assert IGNORE_INDEX == -100


def test_decode_steps_map_masks_and_positions_onto_the_shortened_cache():
    comp = Compaction.from_keep(KEEP)
    short_mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    translation = DecodeTranslation(comp, short_mask)
    assert translation.shrink == 1
    step_mask = torch.cat([MASK, torch.ones(2, 1, dtype=torch.long)], dim=1)  # (B, L + 1) original layout
    assert translation.attention_mask(step_mask, 5).tolist() == [[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]]
    assert translation.attention_mask(None, 6).tolist() == [[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]]
    assert translation.position_ids(torch.tensor([[5], [4]])).tolist() == [[4], [3]]
    kept_in_place = DecodeTranslation(comp, None, shift_positions=False)  # M-RoPE: positions as they were
    assert kept_in_place.position_ids(torch.tensor([[5], [4]])).tolist() == [[5], [4]]
    assert kept_in_place.attention_mask(None, 6) is None
    with pytest.raises(ValueError, match="maps 2-D attention masks"):
        translation.attention_mask(torch.ones(2, 1, 1, 5), 5)
