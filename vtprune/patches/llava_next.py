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
from vtprune.patches.adapter import Adapter

# Channels of the marker tensor sent through pack_image_features.
_IS_TOKEN, _PATCH, _CLS = 0, 1, 2


class LlavaNextAdapter(Adapter):
    supported = ("LlavaNextForConditionalGeneration",)

    def _pack(self, markers: torch.Tensor, image_size: torch.Tensor, strategy: str, newline: torch.Tensor):
        """The model's packing of one image's (n_patches, tokens, C) markers: (n_tokens, C)."""
        packed, _ = self.model.model.pack_image_features(
            [markers], image_size[None], vision_feature_select_strategy=strategy, image_newline=newline
        )
        return packed[0]

    def _tower_inputs(self, image_sizes) -> list[int]:
        """Tower inputs (base + crops) of each image, as ``get_image_features`` splits them."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [
            image_size_to_num_patches(size, self.config.image_grid_pinpoints, self.config.vision_config.image_size)
            for size in image_sizes
        ]

    def image_parts(self, features: list, arguments: dict, cls_rows: torch.Tensor | None) -> list[ImageParts]:
        image_sizes = arguments["image_sizes"]
        strategy = arguments.get("vision_feature_select_strategy") or self.config.vision_feature_select_strategy
        side = self.config.vision_config.image_size // self.config.vision_config.patch_size
        per_patch = side * side + (1 if strategy == "full" else 0)
        newline = torch.zeros(3, dtype=torch.float64)
        newline[_PATCH] = -1
        out, start = [], 0
        for i, (f, n_inputs) in enumerate(zip(features, self._tower_inputs(image_sizes))):
            markers = torch.zeros(n_inputs, per_patch, 3, dtype=torch.float64)
            markers[..., _IS_TOKEN] = 1
            markers[..., _PATCH] = torch.arange(n_inputs, dtype=torch.float64)[:, None]
            if cls_rows is not None:
                markers[..., _CLS] = cls_rows[start : start + n_inputs, -per_patch:].double().cpu()
            start += n_inputs
            packed = self._pack(markers, torch.as_tensor(image_sizes[i]).cpu(), strategy, newline)
            if packed.shape[0] != f.shape[0]:
                raise RuntimeError(
                    f"vtprune could not follow LLaVA-NeXT's packing of image {i}: {packed.shape[0]} tokens "
                    f"expected, the model gave {f.shape[0]}"
                )
            out.append(self._parts(packed, side, per_patch, cls_rows is not None))
        return out

    @staticmethod
    def _parts(packed: torch.Tensor, side: int, per_patch: int, with_cls: bool) -> ImageParts:
        is_token = packed[:, _IS_TOKEN] > 0.5
        from_base = is_token & (packed[:, _PATCH] < 0.5)
        from_crops = is_token & ~from_base
        base = from_base.nonzero().flatten()
        parts = [ImagePart(base, (side, side) if base.numel() == side * side == per_patch else None)]
        crops = from_crops.nonzero().flatten()
        if crops.numel():
            rows = int((~is_token[crops[0] :]).sum())  # one newline closes every row of the crops grid
            grid = (rows, crops.numel() // rows) if rows and crops.numel() % rows == 0 else None
            parts.append(ImagePart(crops, grid))
        cls = packed[:, _CLS].float() * is_token if with_cls else None
        return ImageParts(packed.shape[0], tuple(parts), cls)
