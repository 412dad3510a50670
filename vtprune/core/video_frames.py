"""How one video's visual tokens are laid out, and what the stages prune as one image.

A video reaches the language model as its frames' token grids one after another (LLaVA-NeXT-Video:
each frame's patches pooled 2x2; OneVision: pooled 2x2, then one ``image_newline`` token closing the
video; Qwen2-VL: each temporal patch's merged 2x2 patches). With ``budget="per_frame"`` every frame is
pruned like an image, with its own ``keep``; with ``"per_video"`` the whole video is one image whose
``keep`` counts all its tokens.

Frames the model pools after the tower (LLaVA-NeXT-Video, OneVision) meet a tower-stage pruner with
one rule: the tokens leaving the tower take the pooling's place. Pooling is itself a merge (of every
2x2 patches, fixed); a tower-stage pruner merges (or drops) by content instead, down to ``keep`` of
the frame's pooled token count, so a pooled cell would mix patches of several merged tokens. The
frame's tokens then fill its first slots (the pooled grid's positions, in raster order) in the order
of their first patch, each once, with its own value as it left the tower; the slots left over hold
no token (``merged_slots``). ``keep=1.0`` merges nothing and the model pools as it does unpatched.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.image_parts import ImagePart, ImageParts


@dataclass(frozen=True)
class VideoFrames:
    """``frames`` blocks of ``grid[0] * grid[1]`` tokens (each frame's grid in raster order), then
    ``tail`` fixed tokens; ``scores``: (n_tokens,) fp32 CLS attention per token (0 at the tail) and
    ``keys``: (n_tokens, d) head-mean keys, when a pruner asks for them; ``tower_ids``: (n_tokens,)
    long when a tower-stage pruner reduced the frames (``ImageParts.tower_ids``: -1 at slots holding
    no token and at the tail), else None."""

    frames: int
    grid: tuple[int, int]
    tail: int = 0
    scores: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    tower_ids: torch.Tensor | None = None

    @property
    def tokens_per_frame(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def n_tokens(self) -> int:
        return self.frames * self.tokens_per_frame + self.tail

    def items(self, budget: str) -> list[ImageParts]:
        """The video as the stages prune it: one ``ImageParts`` per frame (``"per_frame"``; the tail
        goes with the last frame, fixed) or one for the whole video (``"per_video"``)."""
        n = self.tokens_per_frame
        if budget == "per_video":
            grid = self.grid if self.frames == 1 else None
            part = ImagePart(torch.arange(self.frames * n), grid)
            return [ImageParts(self.n_tokens, (part,), self.scores, keys=self.keys, tower_ids=self.tower_ids)]
        out = []
        for f in range(self.frames):
            tokens = slice(f * n, (f + 1) * n + (self.tail if f == self.frames - 1 else 0))
            scores = None if self.scores is None else self.scores[tokens]
            keys = None if self.keys is None else self.keys[tokens]
            ids = None if self.tower_ids is None else self.tower_ids[tokens]
            grid = self.grid if ids is None else None  # the slots' tokens are not the pooled grid
            size = tokens.stop - tokens.start
            out.append(ImageParts(size, (ImagePart(torch.arange(n), grid),), scores, keys=keys, tower_ids=ids))
        return out


def merged_slots(token_ids: torch.Tensor, slots: int) -> torch.Tensor:
    """Where the tokens leaving the tower go when they take the pooling's place (see the module's
    docstring): token_ids (F, P) per frame and patch, the tower token each patch left in (-1: dropped
    inside the tower) -> (F, slots) long, per slot the patch whose row fills it (its token's first
    patch; -1 for slots holding no token). A ValueError when a frame has more tokens than slots."""
    frames, patches = token_ids.shape
    out = torch.full((frames, slots), -1, dtype=torch.long)
    for f, ids in enumerate(token_ids.cpu()):
        present = (ids >= 0).nonzero().flatten()
        _, inverse = torch.unique(ids[present], return_inverse=True)
        firsts = torch.full((int(inverse.max()) + 1 if inverse.numel() else 0,), patches, dtype=torch.long)
        firsts = firsts.scatter_reduce(0, inverse, present, "amin").sort().values
        if firsts.numel() > slots:
            raise ValueError(
                f"a video frame left the vision tower as {firsts.numel()} tokens, more than the {slots} the model "
                f"gives a frame after pooling: with a tower-stage pruner on such frames, use keep (at most {slots} "
                f"per frame) rather than the paper's budget"
            )
        out[f, : firsts.numel()] = firsts
    return out


def tokens_in_slots(rows: torch.Tensor, token_ids: torch.Tensor, slots: int) -> torch.Tensor:
    """What a pooled frame's slots hold when the tokens leaving the tower take the pooling's place:
    rows (F, P, D) per frame and patch (a merged token's row on each of its patches), token_ids (F, T)
    with the P patches last -> (F, slots, D), zeros in slots holding no token."""
    patches = rows.shape[1]
    return fill_slots(rows, merged_slots(token_ids[:, -patches:], slots))


def fill_slots(rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """rows (F, P, C) and ``merged_slots``' index (F, S) -> (F, S, C): each slot its patch's row, zeros
    in slots holding no token."""
    index = index.to(rows.device)
    out = rows.gather(1, index.clamp(min=0)[..., None].expand(-1, -1, rows.shape[-1]))
    return out.masked_fill((index < 0)[..., None], 0)
