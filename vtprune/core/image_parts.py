"""How one image's visual tokens are laid out: the parts a pruner scores, and tokens never pruned.

LLaVA-1.5 gives one part, the square patch grid. LLaVA-NeXT gives a base image (a square grid) and
its high-resolution crops (one unpadded grid), with an ``image_newline`` token after each crop row:
newline tokens are fixed (never pruned, never counted in ``keep``). Model-family adapters build an
``ImageParts`` for every image; the vision stage and the LLM stage only read it.

Three index spaces appear here:
- *token* positions: 0..n_tokens-1, the image's placeholder tokens in prompt order (fixed included);
- *prunable* indices: 0..n_prunable-1, the non-fixed tokens in prompt order (what ``keep`` counts and
  what ``PruneStats.kept`` reports);
- part-local indices: 0..len(part)-1, what a pruner's ``select`` returns for one part.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImagePart:
    """index: (n,) ascending token positions of the part; grid: (rows, cols) when those tokens are
    exactly that grid in raster order, else None."""

    index: torch.Tensor
    grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class ImageParts:
    """One image: ``n_tokens`` placeholder tokens, ``parts`` (disjoint, covering every prunable token)
    and per-token CLS attention of the tower ((n_tokens,) fp32, 0 at fixed tokens) when asked for."""

    n_tokens: int
    parts: tuple[ImagePart, ...]
    cls_attention: torch.Tensor | None = None

    @classmethod
    def single(cls, n_tokens: int, grid: tuple[int, int] | None, cls_attention=None) -> ImageParts:
        """Every token prunable, one part (LLaVA-1.5)."""
        grid = grid if grid is not None and grid[0] * grid[1] == n_tokens else None
        return cls(n_tokens, (ImagePart(torch.arange(n_tokens), grid),), cls_attention)

    @property
    def prunable(self) -> torch.Tensor:
        """(n_prunable,) ascending token positions of the prunable tokens."""
        if len(self.parts) == 1:
            return self.parts[0].index
        return torch.cat([p.index for p in self.parts]).sort().values

    @property
    def fixed(self) -> torch.Tensor:
        """(n_tokens - n_prunable,) ascending token positions that are never pruned."""
        mask = torch.ones(self.n_tokens, dtype=torch.bool)
        mask[self.prunable] = False
        return mask.nonzero().flatten()

    @property
    def grid(self) -> tuple[int, int] | None:
        """The patch grid when the prunable tokens are one grid (a single part), else None."""
        return self.parts[0].grid if len(self.parts) == 1 else None

    def token_positions(self, kept: torch.Tensor) -> torch.Tensor:
        """(k + n_fixed,) ascending token positions that stay when the prunable indices ``kept`` do."""
        kept = kept.to("cpu", torch.long)
        if len(self.parts) == 1 and self.parts[0].index.numel() == self.n_tokens:
            return kept
        return torch.cat([self.prunable[kept], self.fixed]).sort().values

    def after_keep(self, kept: torch.Tensor) -> ImageParts:
        """The structure of the image's tokens that remain when ``kept`` (prunable indices) stay:
        kept tokens form one part without a grid, fixed tokens stay fixed."""
        positions = self.token_positions(kept)
        is_fixed = torch.zeros(self.n_tokens, dtype=torch.bool)
        is_fixed[self.fixed] = True
        remaining = (~is_fixed[positions]).nonzero().flatten()
        return ImageParts(positions.numel(), (ImagePart(remaining, None),))


def split_budget(keep: int, sizes: list[int]) -> list[int]:
    """``keep`` tokens shared across parts of ``sizes`` in proportion to their sizes (largest
    remainder; ties to the earlier part), each at most its size."""
    total = sum(sizes)
    if total == 0:
        return [0] * len(sizes)
    keep = min(keep, total)
    shares = [keep * s / total for s in sizes]
    out = [int(s) for s in shares]
    order = sorted(range(len(sizes)), key=lambda i: (-(shares[i] - out[i]), i))
    for i in order[: keep - sum(out)]:
        out[i] += 1
    return out
