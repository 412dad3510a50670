"""LLaVA-1.5 (``LlavaForConditionalGeneration`` and users' own subclasses of it, llava-hf checkpoints).

One fixed-size image per ``<image>``: its tokens are the tower's patch grid in raster order (the
CLS token dropped with ``vision_feature_select_strategy="default"``), every one of them prunable.
"""

from __future__ import annotations

from vtprune.core.image_parts import ImageParts
from vtprune.core.tower_signals import TowerSignals
from vtprune.patches.adapter import Adapter


class LlavaAdapter(Adapter):
    supported = ("LlavaForConditionalGeneration",)

    def visual_tokens(self) -> int | None:
        vision = self.config.vision_config
        size, patch = getattr(vision, "image_size", None), getattr(vision, "patch_size", None)
        if not isinstance(size, int) or not isinstance(patch, int):
            return None
        return (size // patch) ** 2 + (1 if self.config.vision_feature_select_strategy == "full" else 0)

    def image_parts(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[ImageParts]:
        pixel_values = arguments["pixel_values"]
        patch = self.tower.config.patch_size
        return grid_images(features, (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch), signals)


def grid_images(features: list, grid: tuple[int, int], signals: TowerSignals | None) -> list[ImageParts]:
    """Each image's layout when its (n, D) ``features`` are the tower's patch grid in raster order (or,
    with the CLS token kept, the CLS token and that grid), every token prunable; ``signals`` (B, T, C)
    per image as the tower saw it (T >= n: the rows of tokens the features do not hold lead)."""
    out = []
    for i, f in enumerate(features):
        n = f.shape[0]
        scores = keys = ids = None
        if signals is not None and i < signals.values.shape[0]:
            rows = signals.values[i, signals.values.shape[1] - n :]  # the CLS token's own row goes with "default"
            scores, keys = signals.split(rows)
            ids = signals.token_ids(rows)
        out.append(ImageParts.single(n, grid, scores, keys, tower_ids=ids))
    return out
