"""Removing tokens from a batch whose samples lose different numbers (vtprune.core.compaction)."""

import torch

from vtprune.core.compaction import Compaction, scatter_attention


def test_compaction_left_pads_and_restores():
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 1, 0]], dtype=torch.bool)
    comp = Compaction.from_keep(keep)
    assert comp.index.shape == (2, 4)
    assert comp.valid.tolist() == [[False, True, True, True], [True, True, True, True]]
    assert comp.index[0, 1:].tolist() == [0, 2, 3] and comp.index[1].tolist() == [0, 1, 2, 3]
    assert comp.dropped.tolist() == [2, 1]
    x = torch.arange(10.0).reshape(2, 5, 1)
    short = comp.gather(x, fill=-1)
    assert short[..., 0].tolist() == [[-1, 0, 2, 3], [5, 6, 7, 8]]
    back = comp.scatter_into(torch.zeros_like(x), short * 10)
    assert back[..., 0].tolist() == [[0, 0, 20, 30, 0], [50, 60, 70, 80, 0]]
    assert Compaction.from_keep(torch.ones(2, 3, dtype=torch.bool)).is_identity


def test_slots_name_each_original_positions_new_place():
    comp = Compaction.from_keep(torch.tensor([[1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool))
    assert comp.slots().tolist() == [[0, -1, 1, 2], [-1, -1, 1, 2]]
    assert comp.has_padding and not comp.is_identity


def test_gather_broadcasts_a_shared_first_dimension():
    comp = Compaction.from_keep(torch.tensor([[1, 0, 1], [0, 1, 1]], dtype=torch.bool))
    positions = torch.arange(3)[None]  # (1, L), as position ids often are
    assert comp.gather(positions).tolist() == [[0, 2], [1, 2]]


def test_key_columns_extend_past_the_prompt_and_cut_a_cropped_cache():
    comp = Compaction.from_keep(torch.tensor([[1, 0, 1, 1]], dtype=torch.bool))
    index, valid = comp.key_columns(6)  # two decoded tokens after the 4-token prompt
    assert index.tolist() == [[0, 2, 3, 4, 5]] and bool(valid.all())
    index, valid = comp.key_columns(3)  # a crop took the last prompt token back
    assert index.tolist() == [[0, 2]]


def test_scatter_attention_puts_weights_back_at_original_rows_and_columns():
    comp = Compaction.from_keep(torch.tensor([[1, 0, 1]], dtype=torch.bool))
    weights = torch.tensor([[[[1.0, 0.0], [0.25, 0.75]]]])  # (B, H, Q', KV')
    full = scatter_attention(weights, comp.index, comp.valid, comp.length, q_rows=(comp.index, comp.valid))
    assert full[0, 0].tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.25, 0.0, 0.75]]
