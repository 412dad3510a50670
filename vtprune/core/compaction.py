"""Removing tokens from a batch of sequences whose samples lose different numbers of tokens."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Compaction:
    """Maps a batch of length-L sequences onto shorter ones that hold only the kept tokens.

    Samples that keep fewer tokens than the longest are left-padded with masked slots, the same layout
    as a tokenizer's left padding, so the last position stays the last real token.

    index: (B, L') long, the original position of each new slot (padding slots point at a dropped
        position and are never read as real tokens).
    valid: (B, L') bool, False for the padding slots.
    length: L, the original length.
    """

    index: torch.Tensor
    valid: torch.Tensor
    length: int

    @classmethod
    def from_keep(cls, keep: torch.Tensor) -> Compaction:
        """keep: (B, L) bool, True for tokens that stay."""
        new_length = int(keep.sum(dim=1).max()) if keep.numel() else 0
        # A stable sort puts dropped positions first and kept ones last, each group in original order.
        order = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices
        index = order[:, keep.shape[1] - new_length :]
        return cls(index=index, valid=keep.gather(1, index), length=keep.shape[1])

    @property
    def dropped(self) -> torch.Tensor:
        """(B,) long, tokens removed from each sample."""
        return self.length - self.valid.sum(dim=1)

    @property
    def is_identity(self) -> bool:
        return self.index.shape[1] == self.length and bool(self.valid.all())

    @property
    def has_padding(self) -> bool:
        return not bool(self.valid.all())

    def gather(self, x: torch.Tensor, fill=0) -> torch.Tensor:
        """x: (B or 1, L, ...) -> (B, L', ...), padding slots set to ``fill``."""
        b = self.index.shape[0]
        x = x.expand(b, *x.shape[1:])
        idx = self.index.view(*self.index.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:])
        out = x.gather(1, idx)
        valid = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 2)))
        return torch.where(valid, out, torch.as_tensor(fill, dtype=x.dtype, device=x.device))

    def slots(self) -> torch.Tensor:
        """(B, L) long: the new slot of each original position, -1 where it was dropped."""
        b = self.index.shape[0]
        slots = torch.full((b, self.length), -1, dtype=torch.long, device=self.index.device)
        new = torch.arange(self.index.shape[1], device=self.index.device).expand(b, -1)
        return slots.scatter_(1, self.index, torch.where(self.valid, new, -1))

    def scatter_into(self, full: torch.Tensor, short: torch.Tensor) -> torch.Tensor:
        """Copy of ``full`` (B, L, D) with the kept positions overwritten by ``short`` (B, L', D)."""
        out = full.clone()
        b, slot = self.valid.nonzero(as_tuple=True)
        out[b, self.index[b, slot]] = short[b, slot]
        return out

    def key_columns(self, kv_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Original key columns of the compacted cache once it holds ``kv_length`` original positions.

        Positions past L (tokens decoded after the prompt) were never dropped. A cache shorter than L
        lost its last tokens to a crop (assisted decoding rejecting candidates that were part of the
        pruned forward); those are text, kept and right-aligned, so they are cut off the end.
        Returns (index, valid), each (B, L' + kv_length - L).
        """
        b = self.index.shape[0]
        if kv_length < self.length:
            end = self.index.shape[1] - (self.length - kv_length)
            return self.index[:, :end], self.valid[:, :end]
        tail = torch.arange(self.length, kv_length, device=self.index.device).expand(b, -1)
        index = torch.cat([self.index, tail], dim=1)
        valid = torch.cat([self.valid, torch.ones_like(tail, dtype=torch.bool)], dim=1)
        return index, valid


def scatter_attention(
    weights: torch.Tensor,
    kv_index: torch.Tensor,
    kv_valid: torch.Tensor,
    kv_len: int,
    q_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Attention weights of compacted tokens placed back at their original rows and columns.

    weights: (B, H, Q', KV'); kv_index/kv_valid: (B, KV') original column of each compacted key;
    q_rows: (index, valid), each (B, Q'), when the queries were compacted too (prefill), else None.
    Returns (B, H, Q, kv_len), zero wherever a dropped token would have been.
    """
    b, h, q_short, _ = weights.shape
    q_len = q_short if q_rows is None else kv_len
    full = weights.new_zeros(b, h, q_len, kv_len)
    for i in range(b):
        cols = kv_index[i][kv_valid[i]]
        w = weights[i][:, :, kv_valid[i]]
        if q_rows is None:
            full[i][:, :, cols] = w
        else:
            rows = q_rows[0][i][q_rows[1][i]]
            full[i][:, rows[:, None], cols[None, :]] = w[:, q_rows[1][i]]
    return full
