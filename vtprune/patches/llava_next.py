"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, llava-hf ``llava-v1.6-*`` checkpoints): anyres.

Each image reaches the tower as a base image (the whole picture at the tower's resolution) plus
high-resolution crops of it. The model packs them as: the base image's patch grid, then the crops'
patches as one grid with the padding removed, with an ``image_newline`` token after every row.

Here that becomes two parts per image: the base grid and the crops grid (raster order, newlines
excluded); newline tokens are fixed, never pruned and never counted in ``keep``. Which packed token
came from which tower patch is found by running the model's own ``pack_image_features`` on a tensor
of markers instead of features, so unpadding (and, in subclasses, resampling) is followed exactly.
"""

from __future__ import annotations

import torch

from vtprune.core.image_parts import ImagePart, ImageParts
from vtprune.core.tower_signals import TowerSignals
from vtprune.patches.adapter import Adapter

# Channels of the marker tensor sent through pack_image_features; the tower signals follow them.
_IS_TOKEN, _PATCH, _SIGNALS = 0, 1, 2


class LlavaNextAdapter(Adapter):
    supported = ("LlavaNextForConditionalGeneration",)

    def _pack(self, markers: torch.Tensor, image_size: torch.Tensor, arguments: dict, newline: torch.Tensor):
        """The model's packing of one image's (n_patches, tokens, C) markers: (n_tokens, C)."""
        strategy = arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        packed, _ = self.model.model.pack_image_features(
            [markers], image_size[None], vision_feature_select_strategy=strategy, image_newline=newline
        )
        return packed[0]

    def _tower_inputs(self, arguments: dict) -> list[int]:
        """Tower inputs (base + crops) of each image, as ``get_image_features`` splits them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in arguments["image_sizes"]
        ]

    def image_parts(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[ImageParts]:
        strategy = arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        return anyres_images(
            features,
            arguments["image_sizes"],
            signals,
            pack=lambda markers, size, newline: self._pack(markers, size, arguments, newline),
            tower_inputs=self._tower_inputs(arguments),
            side=side,
            # Tokens per tower input after feature selection ("default" drops the first, the CLS token).
            per_patch=side * side + int(self.info.tower_has_cls) - int(strategy == "default"),
            crop_layout=self._crop_layout,
            model_name=type(self.model).__name__,
        )

    def _crop_layout(self, image_size) -> tuple[int, int]:
        """(rows, cols) of the crops the image is cut into, as ``pack_image_features`` computes it."""
        from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

        return get_anyres_image_grid_shape(
            image_size, self.config.image_grid_pinpoints, self.config.vision_config.image_size
        )

    @staticmethod
    def _parts(
        packed: torch.Tensor, side: int, per_patch: int, signals: TowerSignals | None, layout, mixed=None
    ) -> ImageParts:
        is_token = packed[:, _IS_TOKEN] > 0.5
        from_base = is_token & (packed[:, _PATCH] < 0.5)
        from_crops = is_token & ~from_base
        base = from_base.nonzero().flatten()
        parts = [ImagePart(base, (side, side) if base.numel() == side * side == per_patch else None)]
        crops = from_crops.nonzero().flatten()
        per_crop, regions = (), None
        if crops.numel():
            rows = int((~is_token[crops[0] :]).sum())  # one newline closes every row of the crops grid
            grid = (rows, crops.numel() // rows) if rows and crops.numel() % rows == 0 else None
            parts.append(ImagePart(crops, grid))
            if layout is not None and grid is not None:
                per_crop = _split_by_crop(crops, packed[crops, _PATCH], grid, layout)
                regions = _base_regions(side, layout)
        scores = keys = ids = None
        if signals is not None:
            scores, keys = signals.split(packed[:, _SIGNALS:] * is_token[:, None])
            ids = signals.token_ids(packed[:, _SIGNALS:], mixed)
            ids = None if ids is None else torch.where(is_token, ids, -1)
        return ImageParts(packed.shape[0], tuple(parts), scores, per_crop, regions, keys, ids)


def anyres_images(
    features: list,
    image_sizes,
    signals: TowerSignals | None,
    *,
    pack,
    tower_inputs: list[int],
    side: int,
    per_patch: int,
    crop_layout,
    model_name: str,
    signal_rows: list[int] | None = None,
) -> list[ImageParts]:
    """Each anyres image's layout (base grid, crops grid, fixed newlines), following a model's packing.

    features: per image, its (n_tokens, D) packed tokens; image_sizes: per image, (height, width);
    pack: the model's packing of one image's ``(tower inputs, per_patch, C)`` markers given its size and a
    (C,) newline marker, -> (n_tokens, C); tower_inputs: per image, its tower inputs (base + crops);
    signal_rows: per image, the rows of ``signals`` its tower inputs start at (default: one after the
    other; an engine that pads every image to the same number of crops gives its own); crop_layout:
    ``image_size -> (rows, cols)`` of the crops.
    """
    # With merged-token ids, one more channel holds their squares: a packing that mixes rows
    # (resampling) shows as a square that is not the id's square.
    squares = signals is not None and signals.has_ids
    channels = _SIGNALS + (0 if signals is None else signals.values.shape[-1]) + int(squares)
    newline = torch.zeros(channels, dtype=torch.float64)
    newline[_PATCH] = -1
    if signal_rows is None:
        signal_rows = [sum(tower_inputs[:i]) for i in range(len(tower_inputs))]
    out = []
    for i, (f, n_inputs, start) in enumerate(zip(features, tower_inputs, signal_rows)):
        markers = torch.zeros(n_inputs, per_patch, channels, dtype=torch.float64)
        markers[..., _IS_TOKEN] = 1
        markers[..., _PATCH] = torch.arange(n_inputs, dtype=torch.float64)[:, None]
        if signals is not None:
            rows = signals.values[start : start + n_inputs, -per_patch:].double().cpu()
            markers[..., _SIGNALS : _SIGNALS + rows.shape[-1]] = rows
            if squares:
                markers[..., -1] = rows[..., int(signals.has_scores)] ** 2
        size = torch.as_tensor(image_sizes[i]).cpu()
        packed = pack(markers, size, newline)
        mixed = None
        if squares:
            packed, mixed = _without_squares(packed, int(signals.has_scores))
        if packed.shape[0] != f.shape[0]:
            raise RuntimeError(
                f"vtprune could not follow {model_name}'s packing of image {i}: "
                f"{packed.shape[0]} tokens expected, the model gave {f.shape[0]}"
            )
        layout = crop_layout(size) if n_inputs > 1 else None
        out.append(LlavaNextAdapter._parts(packed, side, per_patch, signals, layout, mixed))
    return out


def _without_squares(packed: torch.Tensor, id_channel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed markers without the squares channel, and (n,) bool: the tokens the packing blended
    from patches of different merged tokens (resampled crops grids), whose mean of squared ids
    exceeds the square of their mean id."""
    ids, squares = packed[:, _SIGNALS + id_channel], packed[:, -1]
    return packed[:, :-1], ~torch.isclose(ids**2, squares, rtol=1e-12, atol=1e-6)


def _split_by_crop(crops: torch.Tensor, source: torch.Tensor, grid, layout) -> tuple[ImagePart, ...]:
    """One part per crop (row-major over the crops), each with its own grid.

    crops: token positions of the crops grid's tokens; source: their tower input (1 + crop index;
    fractional where the model resampled the grid, rounded to the nearest crop)."""
    crop = (source.round().long() - 1).clamp(0, layout[0] * layout[1] - 1)
    cols = grid[1]
    out = []
    for c in range(layout[0] * layout[1]):
        mine = (crop == c).nonzero().flatten()
        rows = (mine // cols).unique().numel()
        part_grid = (rows, mine.numel() // rows) if rows and mine.numel() % rows == 0 else None
        out.append(ImagePart(crops[mine], part_grid))
    return tuple(out)


def _base_regions(side: int, layout) -> torch.Tensor:
    """(side * side,) the crop covering each base-image token's region, as GlobalCom² maps them."""
    n_rows, n_cols = layout
    i, j = torch.arange(side).repeat_interleave(side), torch.arange(side).repeat(side)
    row = (i // max(side // n_rows, 1)).clamp(max=n_rows - 1)
    col = (j // max(side // n_cols, 1)).clamp(max=n_cols - 1)
    return row * n_cols + col
