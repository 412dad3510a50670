"""The prompt with dropped tokens removed, and later decode steps mapped onto its shorter cache.

Dropped placeholders leave ``input_ids`` together with their mask, label and position entries, and
the positions after them close up, so the language model sees exactly the prompt a user would have
written with fewer image tokens (families with M-RoPE keep every token's original position instead).
Decode steps that follow a shortened prefill arrive with masks and positions of the original length;
``DecodeTranslation`` maps them onto the shortened cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.compaction import Compaction

IGNORE_INDEX = -100


def shorten_prompt(
    comp: Compaction,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    labels: torch.Tensor | None,
    pad_token_id: int,
) -> dict:
    """The prompt tensors with the dropped tokens removed (samples re-left-padded to one length).

    All inputs are (B, L) (``position_ids`` may be (1, L)); returns the same keys, (B, L').
    """
    short_mask = comp.gather(attention_mask if attention_mask is not None else torch.ones_like(input_ids), fill=0)
    out = {
        "input_ids": comp.gather(input_ids, fill=pad_token_id),
        "attention_mask": short_mask if attention_mask is not None or comp.has_padding else None,
        "labels": None if labels is None else comp.gather(labels, fill=IGNORE_INDEX),
        "position_ids": None,
    }
    if position_ids is not None:
        keep = torch.zeros(comp.index.shape[0], comp.length, dtype=torch.bool, device=input_ids.device)
        keep.scatter_(1, comp.index, comp.valid)
        dropped_before = (~keep).long().cumsum(1)
        out["position_ids"] = comp.gather(position_ids.expand_as(keep) - dropped_before, fill=0)
    return out


@dataclass
class DecodeTranslation:
    """Maps the original-length mask and positions of later steps onto a shortened prefill's cache."""

    comp: Compaction
    short_mask: torch.Tensor | None  # (B, L') mask of the shortened prompt, None if all ones
    shift_positions: bool = True  # False where kept tokens kept their original positions (M-RoPE)

    @property
    def shrink(self) -> int:
        """Prompt positions the shortened cache no longer holds (L - L')."""
        return self.comp.length - self.comp.index.shape[1]

    def attention_mask(self, mask: torch.Tensor | None, total_short: int) -> torch.Tensor | None:
        """mask: (B, L + t) in the original layout, or None; total_short: cache length after this step."""
        if mask is not None and mask.dim() != 2:
            raise ValueError(
                f"vtprune maps 2-D attention masks onto a cache its pruning shortened; got a {mask.dim()}-D mask"
            )
        if mask is not None:
            head = (
                self.short_mask if self.short_mask is not None else torch.ones_like(self.comp.valid, dtype=mask.dtype)
            )
            return torch.cat([head.to(mask.dtype), mask[:, self.comp.length :]], dim=1)
        if self.short_mask is None:
            return None
        tail = self.short_mask.new_ones(self.short_mask.shape[0], total_short - self.short_mask.shape[1])
        return torch.cat([self.short_mask, tail], dim=1)

    def position_ids(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        if position_ids is None or not self.shift_positions:
            return position_ids
        return position_ids - self.comp.dropped[:, None].to(position_ids.device)
