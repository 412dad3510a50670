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
    """One image: ``n_tokens`` placeholder tokens, ``parts`` (disjoint, covering every prunable token),
    and when a pruner asks for them, per-token CLS attention of the tower ((n_tokens,) fp32, 0 at
    fixed tokens) and head-mean keys ((n_tokens, d) fp32).

    Anyres images also say where their crops are: ``crops`` splits the last part (all crop tokens)
    into one part per crop, and ``base_regions`` ((n_base,) long) names, for each token of the first
    part (the base image), the crop covering the same region of the picture.

    tower_ids: (n_tokens,) long when a tower-stage pruner merged patches inside the tower: tokens with
    the same id came from one merged token (the tower's output copied onto each of its patches), -1 at
    fixed tokens and at patches dropped inside the tower; None otherwise.
    """

    n_tokens: int
    parts: tuple[ImagePart, ...]
    cls_attention: torch.Tensor | None = None
    crops: tuple[ImagePart, ...] = ()
    base_regions: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    tower_ids: torch.Tensor | None = None

    @classmethod
    def single(
        cls, n_tokens: int, grid: tuple[int, int] | None, cls_attention=None, keys=None, tower_ids=None
    ) -> ImageParts:
        """Every token prunable, one part (LLaVA-1.5)."""
        grid = grid if grid is not None and grid[0] * grid[1] == n_tokens else None
        return cls(n_tokens, (ImagePart(torch.arange(n_tokens), grid),), cls_attention, keys=keys, tower_ids=tower_ids)

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

    def tower_tokens(self) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The tokens that left the tower (``tower_ids``): the prunable index of each one's first
        patch in prompt order, ascending, and per such token the prunable indices of all its patches.
        Patches dropped inside the tower (id -1) belong to none."""
        ids = self.tower_ids[self.prunable]
        present = (ids >= 0).nonzero().flatten()
        _, token = torch.unique(ids[present], return_inverse=True)
        members = present[torch.argsort(token, stable=True)].split(torch.bincount(token).tolist())
        firsts = torch.stack([m[0] for m in members])
        order = firsts.argsort()
        return firsts[order], [members[i] for i in order.tolist()]

    def restricted(self, positions: torch.Tensor) -> ImageParts:
        """The image as if only its tokens at ``positions`` (ascending token positions, every fixed
        token among them) were there: each part keeps its tokens among them (without a grid), the
        signals and the base image's regions follow."""
        where = torch.full((self.n_tokens,), -1, dtype=torch.long)
        where[positions] = torch.arange(positions.numel())

        def part(p: ImagePart) -> ImagePart:
            index = where[p.index]
            return ImagePart(index[index >= 0], None)

        regions = self.base_regions
        if regions is not None:
            regions = regions[where[self.parts[0].index] >= 0]
        return ImageParts(
            positions.numel(),
            tuple(part(p) for p in self.parts),
            None if self.cls_attention is None else self.cls_attention[positions],
            tuple(part(c) for c in self.crops),
            regions,
            None if self.keys is None else self.keys[positions],
        )

    def after_keep(self, kept: torch.Tensor) -> ImageParts:
        """The structure of the image's tokens that remain when ``kept`` (prunable indices) stay:
        kept tokens form one part without a grid, fixed tokens stay fixed; the tower signals follow."""
        positions = self.token_positions(kept)
        is_fixed = torch.zeros(self.n_tokens, dtype=torch.bool)
        is_fixed[self.fixed] = True
        remaining = (~is_fixed[positions]).nonzero().flatten()
        return ImageParts(
            positions.numel(),
            (ImagePart(remaining, None),),
            cls_attention=None if self.cls_attention is None else self.cls_attention[positions],
            keys=None if self.keys is None else self.keys[positions],
        )


def split_budget(keep: int, sizes: list[int], weights: list[float] | None = None) -> list[int]:
    """``keep`` tokens shared across parts of ``sizes`` in proportion to ``weights`` (default: the
    sizes), each at most its size (what a full part cannot take goes to the others); integer shares
    by largest remainder, ties to the earlier part."""
    keep = min(keep, sum(sizes))
    weights = [float(s) for s in sizes] if weights is None else [float(w) for w in weights]
    out = [0] * len(sizes)
    open_parts = [i for i, s in enumerate(sizes) if s > 0]
    while open_parts:
        left = keep - sum(out)
        total = sum(weights[i] for i in open_parts)
        shares = {i: left * weights[i] / total if total > 0 else left / len(open_parts) for i in open_parts}
        full = [i for i in open_parts if shares[i] >= sizes[i]]
        if not full:
            floors = {i: int(shares[i]) for i in open_parts}
            order = sorted(open_parts, key=lambda i: (-(shares[i] - floors[i]), i))
            for i in order[: left - sum(floors.values())]:
                floors[i] += 1
            for i in open_parts:
                out[i] = floors[i]
            break
        for i in full:
            out[i] = sizes[i]
        open_parts = [i for i in open_parts if i not in full]
    return out


GLOBAL_TEMPERATURE = 10.0  # GlobalCom²'s softmax temperature over the crops' summed base attention


def crop_weights(base_scores: torch.Tensor, base_regions: torch.Tensor, crop_sizes: list[int]) -> list[float]:
    """GlobalCom²'s crop shares: each crop's token count times ``1 + p_c - mean(p)``, where ``p`` is a
    softmax (temperature ``GLOBAL_TEMPERATURE``) over the base image's attention summed per crop region.

    base_scores: (n_base,) fp32 CLS attention of the base image's tokens; base_regions: (n_base,) the
    crop covering each; crop_sizes: tokens of each crop.
    """
    sums = torch.zeros(len(crop_sizes), dtype=torch.float64).index_add_(0, base_regions, base_scores.double().cpu())
    p = torch.softmax((sums - sums.max()) / GLOBAL_TEMPERATURE, dim=0)
    scale = 1 + p - p.mean()
    return [float(scale[c]) * n for c, n in enumerate(crop_sizes)]
