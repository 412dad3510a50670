"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, llava-hf ``llava-onevision-*``).

LLaVA-NeXT's layout (base grid, crops grid with a newline after each row) with three differences,
all followed by running the model's own packing on markers (see ``llava_next.py``): a SigLIP tower
without a CLS token (``cls`` scores the attention each patch receives instead, and warns), crops
grids resampled down when they exceed ``vision_aspect_ratio`` (``anyres_max_9``: nine tower inputs'
worth of tokens), and images of multi-image samples (``batch_num_images`` > 1) sent without crops.

Videos: each frame's patch grid is resized (bilinear) to half its side, rounded up; the frames'
grids follow one another and one ``image_newline`` token closes the video (fixed). A token's score
is its patches' scores resized the same way, by the model's own ``apply_pooling``.
"""

from __future__ import annotations

import torch

from vtprune.core.tower_signals import TowerSignals
from vtprune.core.video_frames import VideoFrames
from vtprune.patches.llava_next import LlavaNextAdapter
from vtprune.patches.llava_next_video import pooled_frames


class LlavaOnevisionAdapter(LlavaNextAdapter):
    supported = ("LlavaOnevisionForConditionalGeneration",)
    no_tower_drops = (
        "its packing resamples large crop grids, which would blend a dropped patch into the tokens around it"
    )

    def _pack(self, markers: torch.Tensor, image_size: torch.Tensor, arguments: dict, newline: torch.Tensor):
        ratio = arguments.get("vision_aspect_ratio") or self.config.vision_aspect_ratio
        packed, _ = self.model.model.pack_image_features(
            [markers], image_size[None], image_newline=newline, vision_aspect_ratio=ratio
        )
        return packed[0]

    def _tower_inputs(self, arguments: dict) -> list[int]:
        crops = super()._tower_inputs(arguments)
        per_sample = arguments.get("batch_num_images")
        if per_sample is None:
            return crops
        alone = [int(n) == 1 for n in per_sample for _ in range(int(n))]
        return [n if single else 1 for n, single in zip(crops, alone)]

    def frame_pool(self):
        def pooled(maps: torch.Tensor) -> torch.Tensor:  # (frames, side, side, C) -> (frames, tokens, C)
            return self.model.model.apply_pooling(maps.reshape(maps.shape[0], maps.shape[1] * maps.shape[2], -1))

        return pooled

    def pooling_site(self):
        return self.model.model, "apply_pooling"

    def video_frames(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[VideoFrames]:
        return pooled_frames(features, self.frame_side(), 1, signals, self.frame_pool())
