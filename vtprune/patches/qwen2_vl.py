"""Qwen2-VL and Qwen2.5-VL (``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration``).

An image's visual tokens are its 2x2-merged patches, in raster order over the merged grid
(``image_grid_thw`` rows (t, h, w) in patches: h/2 x w/2 tokens per frame). Positions are 3-D
(M-RoPE: temporal, height, width; ``get_rope_index``). The vision stage keeps every kept token at its
original 3-D position and the text after the image at its original positions, so layers see exactly
the positions the unpruned prompt gives those tokens; ``model.model.rope_deltas`` (what the model adds
to the cache length for later positions) is set to match the shortened cache, and restored when a
pruned forward raises. ``mm_token_type_ids`` is shortened with the prompt.
"""

from __future__ import annotations

import torch

from vtprune.core.image_parts import ImageParts
from vtprune.core.patching import MethodPatch, PerThread
from vtprune.core.tower_signals import TowerSignals
from vtprune.core.video_frames import VideoFrames
from vtprune.patches.adapter import Adapter


class Qwen2VLAdapter(Adapter):
    supported = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")
    keeps_positions = True
    token_aligned = ("mm_token_type_ids",)

    def __init__(self, model):
        super().__init__(model)
        self._deltas = PerThread()  # per forward in flight: the rope_deltas its shortened prompt needs

    def vision_tower(self):
        return self.model.model.visual

    def feature_layers(self, n_tower: int) -> tuple[int, ...]:
        return (n_tower - 1,)  # the merger reads the last block's output

    def image_parts(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[ImageParts]:
        merge = self.config.vision_config.spatial_merge_size
        return qwen_images(features, arguments["image_grid_thw"], merge, signals, self.tower)

    def video_frames(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[VideoFrames]:
        grids = arguments.get("video_grid_thw")
        if grids is None:
            raise ValueError(f"{type(self.model).__name__} needs video_grid_thw with videos (the processor returns it)")
        return qwen_videos(features, grids, self.config.vision_config.spatial_merge_size, signals, self.tower)

    def original_positions(self, a: dict) -> torch.Tensor:
        """(3, B, L) M-RoPE positions of the full prompt: the ones ``generate()`` passes (their first
        row, text positions, dropped), else the model's own ``get_rope_index``."""
        given = a.get("position_ids")
        if given is not None and given.dim() == 3:
            return given[-3:]
        if a.get("mm_token_type_ids") is None:
            raise ValueError(
                f"{type(self.model).__name__} needs mm_token_type_ids with images (the processor returns it)"
            )
        positions, _ = self.model.model.get_rope_index(
            a["input_ids"],
            mm_token_type_ids=a["mm_token_type_ids"],
            image_grid_thw=a.get("image_grid_thw"),
            video_grid_thw=a.get("video_grid_thw"),
            attention_mask=a.get("attention_mask"),
        )
        return positions

    def shortened(self, comp, positions: torch.Tensor, mask: torch.Tensor | None) -> None:
        # The model continues positions at (tokens in the cache) + rope_deltas: with fewer tokens in
        # the cache, each sample's delta grows by what it lost, so later tokens keep their positions.
        valid = torch.ones_like(positions[0], dtype=torch.bool) if mask is None else mask.bool()
        top = positions.amax(0).masked_fill(~valid, -1).amax(1)  # (B,) highest position of each sample
        self._deltas.get()["after"] = (top + 1 - valid.sum(1) + comp.dropped.to(top.device))[:, None]

    def install(self, config) -> list:
        undo = super().install(config)
        try:
            patch = MethodPatch(self.model, "_prepare_position_ids_for_generation", self._positions_for_generation)
        except Exception:
            for u in reversed(undo):
                u()
            raise
        return [*undo, patch.undo]

    def _positions_for_generation(self, original, inputs_tensor, model_kwargs):
        """``generate()``'s position ids; when it continues a cache the vision stage shortened, the
        positions of the original prompt's continuation (the unpruned model's)."""
        translation = self._generation.decode.get(model_kwargs.get("past_key_values"))
        if translation is None:
            return original(inputs_tensor, model_kwargs)
        # The model would count the shortened cache in original units: mm_token_type_ids sliced at the
        # cache's length would show image tokens again. Without them it continues the text positions
        # (which count every original token) by rope_deltas, which counts the dropped tokens again.
        text_only = {k: v for k, v in model_kwargs.items() if k != "mm_token_type_ids"}
        positions = original(inputs_tensor, text_only)
        return positions - translation.comp.dropped.to(positions.device).view(1, -1, 1)

    def _forward(self, original, a: dict):
        saved = self.model.model.rope_deltas
        with self._deltas.set({}) as deltas:
            try:
                out = super()._forward(original, a)
            except BaseException:
                self.model.model.rope_deltas = saved
                raise
        if "after" in deltas:
            self.model.model.rope_deltas = deltas["after"]
        return out


def qwen_images(
    features: list, grids: torch.Tensor, merge: int, signals: TowerSignals | None, tower
) -> list[ImageParts]:
    """Each image's layout: its tokens in raster order over the merged grid (``grids`` rows (1, h, w) in
    patches, ``merge`` patches a side per token), with its tower signals (read in ``tower``) or None."""
    out = []
    for f, (t, h, w), values in zip(features, grids.tolist(), per_token_signals(signals, grids, features, tower)):
        grid = (h // merge, w // merge) if t == 1 else None
        scores, keys = signals.split(values) if signals is not None else (None, None)
        out.append(ImageParts.single(f.shape[0], grid, scores, keys))
    return out


def qwen_videos(
    features: list, grids: torch.Tensor, merge: int, signals: TowerSignals | None, tower
) -> list[VideoFrames]:
    """Each video's layout: a frame is a temporal patch (``temporal_patch_size`` video frames, 2 by
    default), its tokens in raster order over the merged grid (``grids`` rows (t, h, w) in patches)."""
    out = []
    for (t, h, w), values in zip(grids.tolist(), per_token_signals(signals, grids, features, tower)):
        scores, keys = signals.split(values) if signals is not None else (None, None)
        out.append(VideoFrames(t, (h // merge, w // merge), 0, scores, keys))
    return out


def per_token_signals(signals: TowerSignals | None, grids: torch.Tensor, features: list, tower) -> list:
    """Per image (video), its tokens' (n, C) signals; None each when no pruner asked for any. ``tower``:
    the Qwen2-VL / Qwen2.5-VL tower (transformers' or vLLM's) the patch signals were read in."""
    if signals is None:
        return [None] * len(features)
    return list(_token_signals(signals.values, grids, tower).split([f.shape[0] for f in features]))


def _token_signals(patch_values: torch.Tensor, grids: torch.Tensor, tower) -> torch.Tensor:
    """(tokens, C) per visual token, in the order of the features: the mean over the patches it merges
    of ``patch_values`` ((patches, C) in the tower's block order)."""
    unit = tower.spatial_merge_size**2
    merged = patch_values.reshape(-1, unit, patch_values.shape[-1]).mean(1)
    if hasattr(tower, "window_size"):
        # Qwen2.5-VL runs its blocks on merge groups reordered into attention windows.
        from transformers.vision_utils import get_vision_window_index

        window_index, _ = get_vision_window_index(
            grids,
            spatial_merge_size=tower.spatial_merge_size,
            window_size=tower.window_size,
            patch_size=tower.patch_size,
        )
        merged = merged[torch.argsort(window_index.to(merged.device))]
    return merged.float()
