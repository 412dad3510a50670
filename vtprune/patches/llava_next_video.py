"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``, llava-hf ``LLaVA-NeXT-Video-*``).

Images as in LLaVA-NeXT (anyres, see ``llava_next.py``). A video's frames each go through the tower
and are pooled (``spatial_pool_stride``, 2 by default: a 24 x 24 patch grid becomes 12 x 12 tokens);
the video's tokens are the frames' pooled grids one after another, with no newline tokens. A pooled
token's CLS attention (and keys) is its patches' pooled the same way (mean for average and conv
pooling, max for max pooling).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from vtprune.core.tower_signals import TowerSignals
from vtprune.core.video_frames import VideoFrames, fill_slots, merged_slots
from vtprune.patches.llava_next import LlavaNextAdapter


class LlavaNextVideoAdapter(LlavaNextAdapter):
    supported = ("LlavaNextVideoForConditionalGeneration",)

    def frame_pool(self):
        stride = self.config.spatial_pool_stride
        pool = F.max_pool2d if self.config.spatial_pool_mode == "max" else F.avg_pool2d

        def pooled(maps: torch.Tensor) -> torch.Tensor:  # (frames, side, side, C) -> (frames, tokens, C)
            return pool(maps.permute(0, 3, 1, 2), kernel_size=stride, stride=stride).flatten(2).transpose(1, 2)

        return pooled

    def pooling_site(self):
        return self.model.model.vision_resampler, "forward"

    def video_frames(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[VideoFrames]:
        return pooled_frames(features, self.frame_side(), 0, signals, self.frame_pool())


def pooled_frames(
    features: list, side: int, tail: int, signals: TowerSignals | None, pool: Callable[[torch.Tensor], torch.Tensor]
) -> list[VideoFrames]:
    """Videos whose frames are ``side`` x ``side`` patch grids pooled by ``pool`` ((frames, side, side,
    C) maps -> (frames, tokens, C)), followed by ``tail`` fixed tokens. signals: per frame of all
    videos, the tower's signals, the patches being the last side * side tokens. When a tower-stage
    pruner reduced the frames, their tokens fill the slots instead (``merged_slots``), and so do the
    signals: each slot's are its token's."""
    tokens = pool(torch.zeros(1, side, side, 1)).shape[1]
    pooled_side = int(round(tokens**0.5))
    out, start = [], 0
    for f in features:
        frames, rest = divmod(f.shape[0] - tail, tokens)
        if rest:
            raise RuntimeError(f"a video of {f.shape[0]} tokens is not frames of {tokens} tokens plus {tail}")
        scores = keys = None
        ids = None
        if signals is not None:
            values = signals.values[start : start + frames, -side * side :].float().cpu()
            if signals.has_ids:
                slots = merged_slots(signals.token_ids(values), tokens)
                values = fill_slots(values, slots).reshape(frames * tokens, -1)
                ids = torch.cat(
                    [
                        signals.token_ids(values).masked_fill(slots.flatten() < 0, -1),
                        -torch.ones(tail, dtype=torch.long),
                    ]
                )
            else:
                values = pool(values.reshape(frames, side, side, -1)).reshape(frames * tokens, -1)
            scores, keys = signals.split(torch.cat([values, values.new_zeros(tail, values.shape[1])]))
        start += frames
        out.append(VideoFrames(frames, (pooled_side, pooled_side), tail, scores, keys, ids))
    return out
