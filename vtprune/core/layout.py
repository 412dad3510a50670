"""Where the visual tokens of each sample sit in a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisualLayout:
    """spans[b][i]: (N_i,) ascending positions of image i's prunable tokens in sample b (tokens a
    model never lets go, such as LLaVA-NeXT's row newlines, are not in any span)."""

    spans: list[list[torch.Tensor]]
    length: int

    @classmethod
    def from_placeholders(
        cls, input_ids: torch.Tensor, token_id: int, tokens_per_image: list[int], prunable: list | None = None
    ) -> VisualLayout:
        """Assign the placeholder tokens, in reading order over the batch, to consecutive images.

        input_ids: (B, L); tokens_per_image: visual tokens of each image, in the order the features
        are scattered into the placeholders (row-major over the batch); prunable: per image, the
        ascending (n,) positions among its tokens that may be pruned (None: all of them).
        """
        is_visual = input_ids == token_id
        found, expected = int(is_visual.sum()), sum(tokens_per_image)
        if found != expected:
            raise ValueError(
                f"Image features and image tokens do not match: the prompt has {found} image placeholder "
                f"tokens (id {token_id}) but the images give {expected} features"
            )
        spans: list[list[torch.Tensor]] = [[] for _ in range(input_ids.shape[0])]
        rows, cols = is_visual.nonzero(as_tuple=True)
        start = 0
        for i, n in enumerate(tokens_per_image):
            row = int(rows[start])
            if n and int(rows[start + n - 1]) != row:
                raise ValueError("an image's placeholder tokens are split across two samples of the batch")
            span = cols[start : start + n]
            if prunable is not None and prunable[i].numel() != n:
                span = span[prunable[i].to(span.device)]
            spans[row].append(span)
            start += n
        return cls(spans=spans, length=input_ids.shape[1])

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
