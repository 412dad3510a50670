"""LLaVA-NeXT in vLLM (``LlavaNextForConditionalGeneration``, anyres, CLIP tower): each image's
placeholders are its newline tokens (fixed, as in the transformers path) and the pruner's budget of
its base and crop tokens; the layout follows vLLM's own packing of the crops, run on markers."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, image_size_to_num_patches
from vllm.model_executor.models.llava import LlavaDummyInputsBuilder
from vllm.model_executor.models.llava_next import (
    LlavaNextForConditionalGeneration,
    LlavaNextImageEmbeddingInputs,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.patches.llava_next import anyres_images
from vtprune.serving.family import image_pruning
from vtprune.serving.images import placeholder_count
from vtprune.serving.options import serving_pruner


class PrunedLlavaNextInfo(LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT processing, with each image's placeholder count cut to the pruner's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        pruner = serving_pruner(self.get_hf_config())
        if pruner is None:
            return n
        newlines = self._newlines(image_width, image_height)
        return placeholder_count(pruner, n - newlines, newlines)

    def _newlines(self, width: int, height: int) -> int:
        """The image's newline tokens (one per row of its unpadded crops grid), as vLLM counts them."""
        vision = self.get_vision_encoder_info()
        rows, cols = get_anyres_image_grid_shape(
            image_size=(height, width),
            grid_pinpoints=self.get_hf_config().image_grid_pinpoints,
            patch_size=vision.get_image_size(),
        )
        _, newlines = self._get_num_unpadded_features(
            original_height=height,
            original_width=width,
            npatches=vision.get_patch_grid_length(),
            num_patch_height=rows,
            num_patch_width=cols,
        )
        return newlines


@MULTIMODAL_REGISTRY.register_processor(
    LlavaNextMultiModalProcessor, info=PrunedLlavaNextInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT; with ``hf_overrides={"vtprune": {...}}``, its images pruned before the LLM."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = image_pruning(self.config, self.vision_tower, None)

    def _process_image_input(self, image_input):
        if self.vtprune is None:
            return super()._process_image_input(image_input)
        if isinstance(image_input, LlavaNextImageEmbeddingInputs):
            raise ValueError("vtprune prunes images given as pixels; image embeddings cannot be pruned")
        with self.vtprune.reading() as signals:
            features = list(super()._process_image_input(image_input))
        return self.vtprune.prune(features, self._layouts(features, image_input, signals()))

    def _layouts(self, features: list, image_input, signals) -> list:
        vision = self.config.vision_config
        pixels = image_input["pixel_values"]
        # The tower ran every image's inputs in one batch: padded to the same count when stacked.
        rows = [pixels.shape[1]] * pixels.shape[0] if isinstance(pixels, torch.Tensor) else [v.shape[0] for v in pixels]
        sizes = image_input.get("image_sizes")
        if sizes is None:
            sizes = [[vision.image_size, vision.image_size]] * len(features)
        side = vision.image_size // vision.patch_size
        default = self.config.vision_feature_select_strategy == "default"
        pinpoints = self.config.image_grid_pinpoints
        return anyres_images(
            features,
            sizes,
            signals,
            pack=self._pack_markers,
            tower_inputs=[image_size_to_num_patches(s, pinpoints, vision.image_size) for s in sizes],
            side=side,
            per_patch=side * side + int(self.vtprune.info.tower_has_cls) - int(default),
            crop_layout=lambda size: get_anyres_image_grid_shape(size, pinpoints, vision.image_size),
            model_name=type(self).__name__,
            signal_rows=[sum(rows[:i]) for i in range(len(rows))],
        )

    def _pack_markers(self, markers: torch.Tensor, image_size: torch.Tensor, newline: torch.Tensor) -> torch.Tensor:
        # vLLM's own packing, with marker channels where the features go and a marker newline.
        stand_in = SimpleNamespace(config=self.config, image_newline=newline)
        return LlavaNextForConditionalGeneration._merge_image_patch_embeddings(
            stand_in, image_size, markers, strategy="spatial_unpad"
        )
