"""Model families in the test matrix: how to build a tiny one and feed it images.

Adding a family to the matrix is adding a ``Family`` here (and to ``FAMILIES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache

import torch

from vtprune.testing import IMAGE_TOKEN_ID, image_token_counts, tiny_llava, tiny_llava_next


@dataclass(frozen=True)
class Family:
    name: str
    build: object  # (attn) -> model
    image_shape: tuple[int, ...]  # one image's pixel_values
    sizes: tuple = ()  # image_sizes the images cycle through (families with anyres inputs)

    def model(self, attn: str = "sdpa"):
        return _model(self, attn)

    def images(self, n: int, first: int = 0) -> dict:
        """Per-image inputs of images first..first+n-1 (the same pixels for the same index)."""
        pixels = torch.stack(
            [
                torch.randn(self.image_shape, generator=torch.Generator().manual_seed(100 + i))
                for i in range(first, first + n)
            ]
        )
        out = {"pixel_values": pixels}
        if self.sizes:
            out["image_sizes"] = torch.tensor([self.sizes[i % len(self.sizes)] for i in range(first, first + n)])
        return out

    def batch(self, model, samples: list[tuple[list[int], list[int], int]]) -> tuple[dict, list[dict]]:
        """Left-padded inputs for samples (text before, text after, images), and each sample alone."""
        per_sample, first = [], 0
        for before, after, n in samples:
            images = self.images(n, first) if n else {}
            counts = image_token_counts(model, **images) if n else []
            ids = before + [t for c in counts for t in [IMAGE_TOKEN_ID] * c] + after
            per_sample.append(
                {
                    "input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    **images,
                }
            )
            first += n
        longest = max(s["input_ids"].shape[1] for s in per_sample)
        ids = torch.zeros(len(samples), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(per_sample):
            ids[i, longest - s["input_ids"].shape[1] :] = s["input_ids"][0]
            mask[i, longest - s["input_ids"].shape[1] :] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if first:
            batch.update(self.images(first))
        return batch, per_sample


@cache
def _model(family: Family, attn: str):
    return family.build(attn=attn)


FAMILIES = (
    Family("llava", tiny_llava, (3, 336, 336)),
    # 60x200 is unpadded (rows removed), 150x100 uses 2x1 crops, 200x200 2x2
    Family("llava_next", tiny_llava_next, (5, 3, 112, 112), sizes=((60, 200), (150, 100), (200, 200))),
)
