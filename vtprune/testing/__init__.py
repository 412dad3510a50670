"""Randomly initialised LLaVA-family models built from configs: for tests, the demo and the benchmarks.

Nothing here downloads: the shapes follow LLaVA-1.5 (a CLIP-style tower with a CLS token, 336 px
images in 14 px patches, so 576 visual tokens per image) at whatever width and depth is asked for;
the other families' builders follow their own layouts at tiny sizes.
"""

from vtprune.testing.checkpoints import (
    save_tiny_fast_vlm_hf,
    save_tiny_llava_hf,
    save_tiny_llava_next_hf,
    save_tiny_perception_lm_hf,
    save_tiny_qwen2_vl_hf,
    tiny_llava_next_processor,
    tiny_qwen2_vl_for,
    tiny_qwen2_vl_processor,
    word_tokenizer,
)
from vtprune.testing.models import (
    IMAGE_TOKEN_ID,
    LLAVA_SHAPED_LLM,
    VIDEO_TOKEN_ID,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_next_video,
    tiny_llava_onevision,
    tiny_qwen2_vl,
)
from vtprune.testing.prompts import (
    batch_inputs,
    image_token_counts,
    make_prompt,
    surviving_positions,
    tokens_per_image,
    video_token_counts,
)
from vtprune.testing.timm_vlms import tiny_fast_vlm, tiny_perception_lm

__all__ = [
    "IMAGE_TOKEN_ID",
    "LLAVA_SHAPED_LLM",
    "VIDEO_TOKEN_ID",
    "batch_inputs",
    "image_token_counts",
    "make_prompt",
    "save_tiny_fast_vlm_hf",
    "save_tiny_llava_hf",
    "save_tiny_llava_next_hf",
    "save_tiny_perception_lm_hf",
    "save_tiny_qwen2_vl_hf",
    "surviving_positions",
    "tiny_fast_vlm",
    "tiny_llava",
    "tiny_llava_next",
    "tiny_llava_next_processor",
    "tiny_llava_next_video",
    "tiny_llava_onevision",
    "tiny_perception_lm",
    "tiny_qwen2_vl",
    "tiny_qwen2_vl_for",
    "tiny_qwen2_vl_processor",
    "tokens_per_image",
    "video_token_counts",
    "word_tokenizer",
]
