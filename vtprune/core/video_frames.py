"""How one video's visual tokens are laid out, and what the stages prune as one image.

A video reaches the language model as its frames' token grids one after another (LLaVA-NeXT-Video:
each frame's patches pooled 2x2; OneVision: pooled 2x2, then one ``image_newline`` token closing the
video; Qwen2-VL: each temporal patch's merged 2x2 patches). With ``budget="per_frame"`` every frame is
pruned like an image, with its own ``keep``; with ``"per_video"`` the whole video is one image whose
``keep`` counts all its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vtprune.core.image_parts import ImagePart, ImageParts


@dataclass(frozen=True)
class VideoFrames:
    """``frames`` blocks of ``grid[0] * grid[1]`` tokens (each frame's grid in raster order), then
    ``tail`` fixed tokens; ``scores``: (n_tokens,) fp32 CLS attention per token (0 at the tail) and
    ``keys``: (n_tokens, d) head-mean keys, when a pruner asks for them."""

    frames: int
    grid: tuple[int, int]
    tail: int = 0
    scores: torch.Tensor | None = None
    keys: torch.Tensor | None = None

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
            return [ImageParts(self.n_tokens, (part,), self.scores, keys=self.keys)]
        out = []
        for f in range(self.frames):
            tokens = slice(f * n, (f + 1) * n + (self.tail if f == self.frames - 1 else 0))
            scores = None if self.scores is None else self.scores[tokens]
            keys = None if self.keys is None else self.keys[tokens]
            size = tokens.stop - tokens.start
            out.append(ImageParts(size, (ImagePart(torch.arange(n), self.grid),), scores, keys=keys))
        return out
