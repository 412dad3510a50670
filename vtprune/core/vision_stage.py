"""The vision stage: the LLM receives a shorter prompt that holds only the kept visual tokens.

Dropped placeholders leave ``input_ids`` together with their mask, label and position entries, and
the positions after them close up, so the language model sees exactly the prompt a user would have
written with fewer image tokens (families with M-RoPE keep every token's original position instead;
the adapter passes those). Decode steps that follow a shortened prefill arrive with masks and
positions of the original length; ``DecodeTranslation`` maps them onto the shortened cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.compaction import Compaction
from vtprune.core.image_parts import ImagePart, ImageParts, crop_weights, split_budget
from vtprune.pruners.base import Reduction, VisionPruner, VisionTokens

IGNORE_INDEX = -100


def select_in_parts(pruner: VisionPruner, features: torch.Tensor, parts: ImageParts) -> Reduction:
    """What ``pruner`` keeps (and merges) of one image's tokens, as prunable indices.

    features: (n_tokens, D), the image's tokens after the projector. The image's budget (counted on
    its prunable tokens) is shared across its parts in proportion to their sizes; each part is
    scored on its own, with its own grid and tower signals.
    """
    prunable = parts.prunable
    keep = pruner.keep_count(prunable.numel())
    budgets = split_budget(keep, [p.index.numel() for p in parts.parts])
    scored = list(zip(parts.parts, budgets))
    if pruner.crop_budget == "global" and parts.crops and parts.cls_attention is not None:
        scored = scored[:-1] + _global_crop_budgets(parts, budgets[-1])
    chosen, groups = [], []
    for part, part_keep in scored:
        if part_keep == 0:
            continue
        cls = None if parts.cls_attention is None else parts.cls_attention[part.index]
        keys = None if parts.keys is None else parts.keys[part.index]
        tokens = VisionTokens(
            features=features[part.index.to(features.device)],
            keep=part_keep,
            grid=part.grid,
            cls_attention=cls,
            keys=keys,
        )
        reduction = pruner.reduce(tokens)
        chosen.append(part.index[reduction.kept.cpu()])
        groups += [part.index[g.cpu()] for g in reduction.groups]
    if len(parts.parts) == 1 and prunable.numel() == parts.n_tokens:
        return Reduction(chosen[0].to(features.device), tuple(groups))
    positions = torch.cat(chosen).sort().values
    as_prunable = tuple(torch.searchsorted(prunable, g) for g in groups)
    return Reduction(torch.searchsorted(prunable, positions).to(features.device), as_prunable)


def _global_crop_budgets(parts: ImageParts, keep: int) -> list[tuple[ImagePart, int]]:
    """The crops' share of the budget split across crops by the base image's attention (GlobalCom²)."""
    base = parts.parts[0].index
    sizes = [c.index.numel() for c in parts.crops]
    weights = crop_weights(parts.cls_attention[base], parts.base_regions, sizes)
    return list(zip(parts.crops, split_budget(keep, sizes, weights)))


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
