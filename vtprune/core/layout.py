"""Where the visual tokens of each sample sit in a prompt."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class VisualLayout:
    """spans[b][i]: (N_i,) ascending positions of image i's prunable tokens in sample b, in prompt
    order (tokens a model never lets go, such as LLaVA-NeXT's row newlines, are not in any span);
    items[b][i]: which of the images the features describe it is (their index in ``from_placeholders``'
    order, and in ``merge``'s concatenation); ends[b]: the position of sample b's last placeholder
    token, fixed ones included (-1 without images): where its last image ends."""

    spans: list[list[torch.Tensor]]
    length: int
    items: list[list[int]] = field(default_factory=list)
    ends: list[int] = field(default_factory=list)

    @classmethod
    def from_placeholders(
        cls,
        input_ids: torch.Tensor,
        token_id: int,
        tokens_per_image: list[int],
        prunable: list | None = None,
        kind: str = "image",
    ) -> VisualLayout:
        """Assign the placeholder tokens, in reading order over the batch, to consecutive images.

        input_ids: (B, L); tokens_per_image: visual tokens of each image, in the order the features
        are scattered into the placeholders (row-major over the batch); prunable: per image, the
        ascending (n,) positions among its tokens that may be pruned (None: all of them); kind: what
        the placeholders stand for, in error messages.
        """
        is_visual = input_ids == token_id
        found, expected = int(is_visual.sum()), sum(tokens_per_image)
        if found != expected:
            raise ValueError(
                f"{kind.capitalize()} features and {kind} tokens do not match: the prompt has {found} {kind} "
                f"placeholder tokens (id {token_id}) but the {kind}s give {expected} features"
            )
        spans: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        items: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
        rows, cols = is_visual.nonzero(as_tuple=True)
        start = 0
        for i, n in enumerate(tokens_per_image):
            row = int(rows[start])
            if n and int(rows[start + n - 1]) != row:
                raise ValueError(f"the placeholder tokens of one {kind} are split across two samples of the batch")
            span = cols[start : start + n]
            if prunable is not None and prunable[i].numel() != n:
                span = span[prunable[i].to(span.device)]
            spans[row].append(span)
            items[row].append(i)
            start += n
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        ends = torch.where(is_visual, positions, -1).amax(1).tolist() if input_ids.shape[1] else []
        return cls(spans=spans, length=input_ids.shape[1], items=items, ends=ends)

    @classmethod
    def merge(cls, layouts: list[VisualLayout]) -> VisualLayout:
        """One layout of several placeholder kinds (images, videos) of the same prompt: each sample's
        spans in prompt order; item numbers continue across ``layouts`` in their order."""
        if len(layouts) == 1:
            return layouts[0]
        spans, items, offset = [[] for _ in layouts[0].spans], [[] for _ in layouts[0].spans], 0
        for layout in layouts:
            for b in range(len(spans)):
                spans[b] += layout.spans[b]
                items[b] += [i + offset for i in layout.items[b]]
            offset += sum(len(i) for i in layout.items)
        for b in range(len(spans)):
            order = sorted(range(len(spans[b])), key=lambda i: int(spans[b][i][0]))
            spans[b], items[b] = [spans[b][i] for i in order], [items[b][i] for i in order]
        ends = [max(layout.ends[b] for layout in layouts) for b in range(len(spans))]
        return cls(spans=spans, length=layouts[0].length, items=items, ends=ends)

    @property
    def has_images(self) -> bool:
        return any(self.spans)

    def keep_mask(self, kept: list[list[torch.Tensor]], device) -> torch.Tensor:
        """(B, L) bool: every token stays except the visual tokens not in ``kept[b][i]`` (indices
        into image i's tokens)."""
        keep = torch.ones(len(self.spans), self.length, dtype=torch.bool, device=device)
        for b, images in enumerate(self.spans):
            for span, idx in zip(images, kept[b]):
                dropped = torch.ones(span.numel(), dtype=torch.bool, device=device)
                dropped[idx] = False
                keep[b, span[dropped]] = False
        return keep

    def per_sample(self, per_item: list) -> list[list]:
        """``per_item`` (one entry per item, in item order) arranged like ``spans``."""
        return [[per_item[i] for i in items] for items in self.items]

    def sample_groups(self, groups: list[list[tuple[torch.Tensor, ...]]]) -> list[list[torch.Tensor]]:
        """Per sample, the merged tokens' groups (``groups[b][i]``: image i's, indices into its tokens)
        as indices into the sample's visual-token sequence, in prompt order of their images."""
        out = []
        for images, per_image in zip(self.spans, groups):
            offset, sample = 0, []
            for span, image_groups in zip(images, per_image):
                sample += [g.to("cpu", torch.long) + offset for g in image_groups]
                offset += span.numel()
            out.append(sample)
        return out

    def sample_kept(self, kept: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per sample, ``kept`` as ascending indices into that sample's visual-token sequence
        (its images' tokens concatenated in prompt order)."""
        out = []
        for images, idx in zip(self.spans, kept):
            offsets, parts = 0, []
            for span, i in zip(images, idx):
                parts.append(i.to("cpu", torch.long) + offsets)
                offsets += span.numel()
            out.append(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long))
        return out

    def visual_counts(self) -> list[int]:
        return [sum(s.numel() for s in images) for images in self.spans]
