"""Qwen2-VL and Qwen2.5-VL in vLLM: each image's placeholders are the pruner's budget, its
tokens the ones the pruner keeps of its merged-patch grid, each at its original 3-D M-RoPE position
and the text at the unpruned prompt's positions, as the transformers path gives them (``mrope.py``)."""

from __future__ import annotations

import dataclasses

from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.patches.qwen2_vl import qwen_images
from vtprune.serving.family import image_placeholders, image_pruning
from vtprune.serving.mrope import Media, place_tokens, prompt_positions, with_places
from vtprune.serving.options import serving_pruner
from vtprune.serving.runner import ASKS


class _PrunedCounts:
    """vLLM's Qwen processing info, with each image's placeholder count cut to the budget."""

    def get_num_image_tokens(self, **kwargs) -> int:
        return image_placeholders(self.get_hf_config(), super().get_num_image_tokens(**kwargs))

    def get_supported_mm_limits(self):
        limits = super().get_supported_mm_limits()
        if serving_pruner(self.get_hf_config()) is None:
            return limits
        # Videos are not pruned in vLLM yet: with pruning on, the engine refuses them (vLLM's message).
        return {modality: n for modality, n in limits.items() if modality != "video"}


class _PrunedReplacements:
    """vLLM's Qwen processor, writing the pruner's budget of placeholders for each image."""

    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        updates = super()._get_prompt_updates(mm_items, hf_processor_mm_kwargs, out_mm_kwargs)
        hf_config = self.info.get_hf_config()
        if serving_pruner(hf_config) is None:
            return updates

        def cut(update):
            def replacement(item_idx: int):
                ids = update.replacement(item_idx)
                return ids[: image_placeholders(hf_config, len(ids))]

            return dataclasses.replace(update, replacement=replacement)

        return [cut(u) if u.modality == "image" else u for u in updates]


class PrunedQwen2VLInfo(_PrunedCounts, Qwen2VLProcessingInfo):
    pass


class PrunedQwen2VLProcessor(_PrunedReplacements, Qwen2VLMultiModalProcessor):
    pass


class PrunedQwen2_5_VLInfo(_PrunedCounts, Qwen2_5_VLProcessingInfo):
    pass


class PrunedQwen2_5_VLProcessor(_PrunedReplacements, Qwen2_5_VLMultiModalProcessor):
    pass


class _PrunedQwen:
    """What vtprune adds to vLLM's Qwen2-VL and Qwen2.5-VL models; with no ``vtprune`` options they are
    vLLM's own."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        vision = self.config.vision_config
        self.vtprune = image_pruning(self.config, self.visual, None, (vision.depth, (vision.depth - 1,)))
        if self.vtprune is None:
            return
        if self.use_data_parallel:
            raise ValueError(
                "vtprune's vLLM plugin reads the vision tower in one process: serve with the default "
                "mm_encoder_tp_mode, not 'data'"
            )
        if self.multimodal_config.is_multimodal_pruning_enabled():
            raise ValueError(
                "vtprune and vLLM's own video pruning (video_pruning_rate) were both asked for: choose one"
            )
        setattr(self, ASKS, True)  # the runner then calls recompute_mrope_positions (runner.py)

    def _process_image_input(self, image_input):
        """Per image, its kept tokens (k, D + PLACE_CHANNELS), their grid places appended."""
        if self.vtprune is None:
            return super()._process_image_input(image_input)
        if image_input["type"] != "pixel_values":
            raise ValueError("vtprune prunes images given as pixels; image embeddings cannot be pruned")
        with self.vtprune.reading() as signals:
            features = list(super()._process_image_input(image_input))
        grids = image_input["image_grid_thw"]
        merge = self.visual.spatial_merge_size
        layouts = qwen_images(features, grids, merge, signals(), self.visual)
        pruned = self.vtprune.prune_in_place(features, layouts)
        return tuple(
            with_places(tokens, places, (t, h // merge, w // merge))
            for (tokens, places), (t, h, w) in zip(pruned, grids.tolist())
        )

    def get_mrope_input_positions(self, input_tokens, mm_features):
        if self.vtprune is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        media = [
            Media(offset, f.mm_position.length, (t, h, w), t_factor)
            for f, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(features))
        ]
        return prompt_positions(len(input_tokens), media)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens):
        if self.vtprune is None:
            return super().recompute_mrope_positions(
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens
            )
        return place_tokens(list(multimodal_embeddings), mrope_positions, num_computed_tokens)

    def embed_input_ids(self, input_ids, multimodal_embeddings=None, *, is_multimodal=None):
        if self.vtprune is not None and multimodal_embeddings is not None and len(multimodal_embeddings):
            if multimodal_embeddings[0].shape[-1] != self.config.text_config.hidden_size:
                raise RuntimeError(
                    "vtprune: the media embeddings still carry their grid places: this vLLM runner did not call "
                    "the model's recompute_mrope_positions (vtprune.serving.runner turns it on for vLLM 0.32)"
                )
        return super().embed_input_ids(input_ids, multimodal_embeddings, is_multimodal=is_multimodal)

    def get_encoder_cudagraph_config(self):
        config = super().get_encoder_cudagraph_config()
        # The graphs replay the tower alone: the pruning after it would not run.
        return config if self.vtprune is None else dataclasses.replace(config, modalities=[])


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2VLProcessor, info=PrunedQwen2VLInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class PrunedQwen2VLForConditionalGeneration(_PrunedQwen, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL; with ``hf_overrides={"vtprune": {...}}``, its images pruned before the LLM."""


@MULTIMODAL_REGISTRY.register_processor(
    PrunedQwen2_5_VLProcessor, info=PrunedQwen2_5_VLInfo, dummy_inputs=Qwen2_5_VLDummyInputsBuilder
)
class PrunedQwen2_5_VLForConditionalGeneration(_PrunedQwen, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL; with ``hf_overrides={"vtprune": {...}}``, its images pruned before the LLM."""
