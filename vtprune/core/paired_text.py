"""The text each image of a prompt comes with: for a pruner that weighs an image's tokens against
its own caption or question (CATP's alignment term), in a prompt of several image-text pairs."""

from __future__ import annotations

import torch

from vtprune.core.layout import VisualLayout


def paired_text(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    layout: VisualLayout,
    ignored: frozenset,
    *,
    or_before: bool = False,
) -> list[torch.Tensor]:
    """Per item (``layout``'s numbering), the (T,) positions in its sample of the text paired with it:
    the prompt's tokens after the item up to the next item of the sample (or the prompt's end),
    leaving out padding, placeholder tokens and the ``ignored`` ids (a model's special tokens). An
    item followed directly by another (a video's frames, images with nothing between them) shares
    the text after that run; an item with no text after it gets none (empty positions), or with
    ``or_before`` the sample's text before it (a question written ahead of its image).

    input_ids: (B, L); attention_mask: (B, L) or None.
    """
    out: list[torch.Tensor | None] = [None] * sum(len(items) for items in layout.items)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    for b, spans in enumerate(layout.spans):
        if not spans:
            continue
        ids = input_ids[b]
        placeholders = set(ids[torch.cat(spans)].unique().tolist())
        text = ~torch.isin(ids, torch.tensor(sorted(placeholders | set(ignored)), device=ids.device))
        if attention_mask is not None:
            text &= attention_mask[b].bool()
        following = positions.new_zeros(0)
        for i in reversed(range(len(spans))):  # from the last item back: a textless item takes the next's
            end = int(spans[i].max()) + 1
            stop = int(spans[i + 1].min()) if i + 1 < len(spans) else ids.numel()
            segment = positions[end:stop][text[end:stop]]
            following = segment if segment.numel() else following
            if or_before and not following.numel():
                start = int(spans[i].min())
                out[layout.items[b][i]] = positions[:start][text[:start]]
            else:
                out[layout.items[b][i]] = following
    return out
