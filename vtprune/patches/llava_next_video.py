"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``, llava-hf ``LLaVA-NeXT-Video-*``).

Images as in LLaVA-NeXT (anyres, see ``llava_next.py``). A video's frames each go through the tower
and are pooled (``spatial_pool_stride``, 2 by default: a 24 x 24 patch grid becomes 12 x 12 tokens);
the video's tokens are the frames' pooled grids one after another, with no newline tokens. A pooled
token's CLS attention is its patches' pooled the same way (mean for average and conv pooling, max for
max pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vtprune.core.video_frames import VideoFrames
from vtprune.patches.llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    supported = ("LlavaNextVideoForConditionalGeneration",)

    def video_frames(self, features: list, arguments: dict, cls_rows: torch.Tensor | None) -> list[VideoFrames]:
        stride = self.config.spatial_pool_stride
        pool = F.max_pool2d if self.config.spatial_pool_mode == "max" else F.avg_pool2d

        def pooled(maps: torch.Tensor) -> torch.Tensor:  # (frames, side, side) -> (frames, tokens)
            return pool(maps[:, None], kernel_size=stride, stride=stride).flatten(1)

        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return pooled_frames(features, side, 0, cls_rows, pooled)


def pooled_frames(
    features: list, side: int, tail: int, cls_rows: torch.Tensor | None, pool: Callable[[torch.Tensor], torch.Tensor]
) -> list[VideoFrames]:
    """Videos whose frames are ``side`` x ``side`` patch grids pooled by ``pool`` ((frames, side, side)
    maps -> (frames, tokens)), followed by ``tail`` fixed tokens. cls_rows: (frames of all videos, T)
    tower attention rows, the patches being the last side * side columns."""
    tokens = pool(torch.zeros(1, side, side)).shape[1]
    pooled_side = int(round(tokens**0.5))
    out, start = [], 0
    for f in features:
        frames, rest = divmod(f.shape[0] - tail, tokens)
        if rest:
            raise RuntimeError(f"a video of {f.shape[0]} tokens is not frames of {tokens} tokens plus {tail}")
        scores = None
        if cls_rows is not None:
            maps = cls_rows[start : start + frames, -side * side :].float().cpu().reshape(frames, side, side)
            scores = torch.cat([pool(maps).reshape(-1), torch.zeros(tail)])
        start += frames
        out.append(VideoFrames(frames, (pooled_side, pooled_side), tail, scores))
    return out
