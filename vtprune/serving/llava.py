"""LLaVA-1.5 in vLLM (``LlavaForConditionalGeneration`` with a CLIP tower): each image's placeholders
are the pruner's budget, and its tokens the ones the pruner keeps of the tower's patch grid."""

from __future__ import annotations

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaImageEmbeddingInputs,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.multimodal import MULTIMODAL_REGISTRY

from vtprune.patches.llava import grid_images
from vtprune.serving.family import image_placeholders, image_pruning
from vtprune.serving.options import requested


class PrunedLlavaInfo(LlavaProcessingInfo):
    """vLLM's LLaVA processing, with each image's placeholder count cut to the pruner's budget."""

    def get_num_image_tokens(self, *, image_width: int, image_height: int) -> int:
        n = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        return image_placeholders(self.get_hf_config(), n)


def _info(ctx):
    if _pixtral(ctx.get_hf_config()):
        return _build_llava_or_pixtral_hf_info(ctx)  # vLLM's own, which pruning is refused on
    return PrunedLlavaInfo(ctx)


def _pixtral(hf_config) -> bool:
    """Whether this is a Pixtral-HF checkpoint (served by vLLM's LLaVA class), which vtprune does not
    prune: its images have variable sizes and its tower is not read here."""
    if hf_config.vision_config.model_type != "pixtral":
        return False
    if requested(hf_config) is not None:
        raise NotImplementedError(
            "vtprune's vLLM plugin does not prune Pixtral-HF checkpoints (LlavaForConditionalGeneration with a "
            "Pixtral tower); serve them without hf_overrides['vtprune']"
        )
    return True


@MULTIMODAL_REGISTRY.register_processor(
    _build_llava_or_pixtral_hf_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder
)
class PrunedLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5; with ``hf_overrides={"vtprune": {...}}``, its images pruned before the LLM."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.vtprune = None
        if _pixtral(self.config):
            return
        vision = self.config.vision_config
        tokens = (vision.image_size // vision.patch_size) ** 2
        tokens += 1 if self.config.vision_feature_select_strategy == "full" else 0
        self.vtprune = image_pruning(self.config, self.vision_tower, tokens)

    def _process_image_input(self, image_input):
        if self.vtprune is None:
            return super()._process_image_input(image_input)
        if isinstance(image_input, LlavaImageEmbeddingInputs):
            raise ValueError("vtprune prunes images given as pixels; image embeddings cannot be pruned")
        with self.vtprune.reading() as signals:
            embeds = super()._process_image_input(image_input)
        features = list(embeds)
        patch = self.config.vision_config.patch_size
        pixels = image_input["pixel_values"]
        grid = (pixels.shape[-2] // patch, pixels.shape[-1] // patch)
        return self.vtprune.prune(features, grid_images(features, grid, signals()))
