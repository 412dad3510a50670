"""Attention masks for compacted decoder layers (vtprune.core.masks): the compacted mask equals the
original mask read at the kept rows and columns, in every form transformers hands a layer."""

import pytest
import torch

from vtprune.core.compaction import Compaction
from vtprune.core.masks import compact_mask

KEEP = torch.tensor([[1, 1, 0, 1, 0, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)  # 4 and 3: a padding slot
PADDING = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)


def _allowed_full() -> torch.Tensor:
    """(B, 1, L, L) bool: causal attention to non-padding keys."""
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    return causal[None, None] & PADDING[:, None, None, :]


def _expected(comp: Compaction) -> torch.Tensor:
    full = _allowed_full()
    rows = full.gather(2, comp.index[:, None, :, None].expand(-1, 1, -1, 6))
    allowed = rows.gather(3, comp.index[:, None, None, :].expand(-1, 1, comp.index.shape[1], -1))
    return allowed & comp.valid[:, None, None, :] & comp.valid[:, None, :, None]


def _compact(mask, comp, flash=False):
    return compact_mask(
        mask,
        q_index=comp.index,
        q_valid=comp.valid,
        kv_index=comp.index,
        kv_valid=comp.valid,
        q_len=6,
        kv_len=6,
        flash=flash,
    )


@pytest.mark.parametrize("form", ["bool", "additive"])
def test_a_4d_mask_is_read_at_the_kept_rows_and_columns_in_its_own_form(form):
    comp = Compaction.from_keep(KEEP)
    full = _allowed_full()
    if form == "additive":
        full = torch.zeros(full.shape).masked_fill_(~full, torch.finfo(torch.float32).min)
    out = _compact(full, comp)
    assert out.dtype == full.dtype
    allowed = out if form == "bool" else out == 0
    valid_rows = comp.valid[:, None, :, None]
    assert torch.equal(allowed & valid_rows, _expected(comp))
    # padding slots attend to themselves only, so no softmax row is all masked
    assert bool(allowed.any(-1).all())


def test_no_mask_means_causal_over_the_kept_tokens_and_none_without_padding_slots():
    even = Compaction.from_keep(torch.tensor([[1, 0, 1, 1]], dtype=torch.bool))
    assert _compact(None, even) is None  # the kernels' causal fast path
    uneven = Compaction.from_keep(KEEP)
    out = _compact(None, uneven)
    causal = torch.tril(torch.ones(6, 6, dtype=torch.bool))[None, None].expand(2, 1, 6, 6)
    rows = causal.gather(2, uneven.index[:, None, :, None].expand(-1, 1, -1, 6))
    expected = rows.gather(3, uneven.index[:, None, None, :].expand(-1, 1, 4, -1)) & uneven.valid[:, None, None, :]
    assert torch.equal(out & uneven.valid[:, None, :, None], expected & uneven.valid[:, None, :, None])


def test_flash_attention_gets_a_2d_padding_mask_of_the_kept_keys():
    comp = Compaction.from_keep(KEEP)
    out = _compact(PADDING.long(), comp, flash=True)
    assert out.dtype == torch.long
    assert torch.equal(out.bool(), PADDING.gather(1, comp.index) & comp.valid)


def test_decode_steps_compact_only_the_keys():
    comp = Compaction.from_keep(KEEP)
    kv_index, kv_valid = comp.key_columns(7)  # one decoded token after the prompt
    out = compact_mask(
        None, q_index=None, q_valid=None, kv_index=kv_index, kv_valid=kv_valid, q_len=1, kv_len=7, flash=False
    )
    assert out.shape == (2, 1, 1, kv_index.shape[1])
    assert torch.equal(out[:, 0, 0], kv_valid)
