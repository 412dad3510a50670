"""PerceptionLM (``PerceptionLMForConditionalGeneration``; a Perception Encoder tower from timm, a
pooling projector, images and videos).

Each image reaches the tower as ``pixel_values[i]``: its thumbnail (the whole picture at the tile
size) then its tiles, row-major (one crop only with ``vision_input_type="vanilla"``). Each crop's patch
grid, the CLS token dropped, is projected and average-pooled ``projector_pooling_ratio`` x
``projector_pooling_ratio`` (448 px, 14 px patches, ratio 2: 16 x 16 tokens); the image's tokens are
its crops' pooled grids one after another. Here that becomes two parts per image: the thumbnail's grid
and the tiles (every tile's grid in turn; no grid as a whole), all prunable. The tiles' arrangement
(rows x columns) is not among the model's inputs, so GlobalCom²'s budget (``crop_budget="global"``),
which maps thumbnail regions to tiles, is refused.

A video (``pixel_values_videos[v]``: frames) goes through the same method and pooling, one crop per
frame: ``VideoFrames`` of the pooled grid, no closing token. A token's tower signals (CLS attention,
keys) are its patches' pooled by the model's own pooling module.
"""

from __future__ import annotations

import torch

from vtprune.core.image_parts import ImagePart, ImageParts
from vtprune.core.tower_signals import TowerSignals
from vtprune.core.video_frames import VideoFrames
from vtprune.patches import towers
from vtprune.patches.adapter import Adapter
from vtprune.patches.llava_next_video import pooled_frames
from vtprune.pruners.pipeline import as_pipeline


class PerceptionLMAdapter(Adapter):
    supported = ("PerceptionLMForConditionalGeneration",)

    def encoder(self, modality: str) -> tuple[str, str]:
        return "get_image_features", "pixel_values"  # videos too: frames are crops

    def feature_items(self, pooler_output, arguments: dict) -> list[torch.Tensor]:
        items = arguments["pixel_values"].shape[0]  # (images or videos, crops or frames, 3, H, W)
        return list(pooler_output.reshape(items, -1, pooler_output.shape[-1]))

    def feature_layers(self, n_tower: int) -> tuple[int, ...]:
        return (n_tower - 1,)  # the last block (before the final norm)

    def frame_side(self) -> int:
        return int(self.tower.timm_model.patch_embed.grid_size[0])

    def check(self, config) -> None:
        super().check(config)
        for pruner in as_pipeline(config).pruners:
            if getattr(pruner, "crop_budget", None) == "global":
                raise ValueError(
                    f"the {pruner.name!r} pruner's crop_budget='global' shares an image's budget across its "
                    f"tiles by the thumbnail's attention over each tile's region, and PerceptionLM's inputs do "
                    f"not say how its tiles are arranged; use crop_budget='proportional'"
                )

    def _pool(self, maps: torch.Tensor) -> torch.Tensor:
        """(crops, side, side, C) per-patch values -> (crops, tokens, C), pooled as the projector pools."""
        pooling = self.model.model.multi_modal_projector.pooling
        return pooling(maps.flatten(1, 2).to(torch.float32))

    def _side(self, pixel_values: torch.Tensor) -> int:
        return pixel_values.shape[-1] // towers.patch_size(self.tower, towers.tower_spec(self.tower))

    def image_parts(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[ImageParts]:
        pixel_values = arguments["pixel_values"]
        crops, side = pixel_values.shape[1], self._side(pixel_values)
        out = []
        for i, f in enumerate(features):
            per_crop = f.shape[0] // crops
            parts = [ImagePart(torch.arange(per_crop), _square(per_crop))]
            if crops > 1:
                parts.append(ImagePart(torch.arange(per_crop, f.shape[0]), None))
            scores = keys = None
            if signals is not None:
                patches = signals.values[i * crops : (i + 1) * crops, -side * side :].float().cpu()
                pooled = self._pool(patches.reshape(crops, side, side, -1))
                scores, keys = signals.split(pooled.reshape(f.shape[0], -1))
            out.append(ImageParts(f.shape[0], tuple(parts), scores, keys=keys))
        return out

    def video_frames(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[VideoFrames]:
        if "pixel_values" not in arguments:  # features encoded without vtprune: one row per frame, no videos
            raise NotImplementedError(
                "PerceptionLM's video features do not say which frames make one video when they were encoded "
                "without vtprune (mm_encoder_outputs computed before vtprune.apply); pass pixel_values_videos"
            )
        return pooled_frames(features, self._side(arguments["pixel_values"]), 0, signals, self._pool)


def _square(n: int) -> tuple[int, int] | None:
    side = round(n**0.5)
    return (side, side) if side * side == n else None
