"""The tiny models themselves, one builder per family (configs only, no downloads).

Nothing here downloads: the shapes follow LLaVA-1.5 (a CLIP-style tower with a CLS token, 336 px
images in 14 px patches, so 576 visual tokens per image) at whatever width and depth is asked for.
"""

from __future__ import annotations

import torch

IMAGE_TOKEN_ID = 31


# The language model of the benchmark scripts: LLaVA-1.5-7B's shape at 1/4 width and 1/4 depth.
LLAVA_SHAPED_LLM = {"hidden": 1024, "layers": 8, "heads": 16, "kv_heads": 16, "intermediate": 2816, "vocab": 32000}


def tiny_llava(
    *,
    attn: str = "sdpa",
    image_size: int = 336,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 96,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    image_token_id: int = IMAGE_TOKEN_ID,
):
    """A random ``LlavaForConditionalGeneration`` in eval mode (image token id ``IMAGE_TOKEN_ID``)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    config = LlavaConfig(
        vision_config=_clip_config(image_size, patch_size, vision_hidden, vision_layers, vision_heads),
        text_config=_llama_config(hidden, layers, heads, kv_heads, intermediate, vocab),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        pad_token_id=0,
    )
    return _finish(LlavaForConditionalGeneration, config, attn, dtype, seed)


def _clip_config(image_size: int, patch_size: int, hidden: int, layers: int, heads: int):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        projection_dim=hidden,
    )


def _text_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int | None, vocab: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate or 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "vocab_size": vocab,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _llama_config(hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int | None, vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_config(hidden, layers, heads, kv_heads, intermediate, vocab))


def _finish(model_class, config, attn: str, dtype: torch.dtype, seed: int):
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = model_class(config).to(dtype).eval()
    # Random init leaves logits nearly flat; a larger output scale makes greedy decoding decisive,
    # so equality tests compare real choices instead of near-ties.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = None
    return model


def tiny_llava_next(
    *,
    attn: str = "sdpa",
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 96,
    seed: int = 0,
    video: bool = False,
):
    """A random ``LlavaNextForConditionalGeneration`` (anyres) in eval mode, image token id
    ``IMAGE_TOKEN_ID``, crops of 1x2, 2x1 or 2x2 tower inputs (LLaVA-1.6's pinpoints at
    ``image_size=336``: 576 base tokens, up to 2,304 crop tokens). By default 8 x 8 patches per tower
    input: feed it ``pixel_values`` (images, 5, 3, 112, 112) and ``image_sizes`` (images, 2), as its
    processor does."""
    import transformers

    s = image_size
    family = "LlavaNextVideo" if video else "LlavaNext"
    config = getattr(transformers, f"{family}Config")(
        vision_config=_clip_config(image_size, patch_size, vision_hidden, vision_layers, vision_heads),
        text_config=_llama_config(hidden, layers, heads, kv_heads, intermediate, vocab),
        image_token_id=IMAGE_TOKEN_ID,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        pad_token_id=0,
        **({"video_token_id": VIDEO_TOKEN_ID, "spatial_pool_stride": 2} if video else {}),
    )
    return _finish(getattr(transformers, f"{family}ForConditionalGeneration"), config, attn, torch.float32, seed)


VIDEO_TOKEN_ID = 30


def tiny_llava_next_video(**options):
    """A random ``LlavaNextVideoForConditionalGeneration`` in eval mode, ``tiny_llava_next``'s options:
    images as ``tiny_llava_next``'s, videos ``pixel_values_videos`` (videos, frames, 3, 112, 112)
    whose frames' 8 x 8 patches are pooled 2x2 to 4 x 4 tokens. Image token id ``IMAGE_TOKEN_ID``,
    video ``VIDEO_TOKEN_ID``."""
    return tiny_llava_next(**options, video=True)


def tiny_llava_onevision(
    *,
    attn: str = "sdpa",
    image_size: int = 112,
    patch_size: int = 14,
    vision_hidden: int = 32,
    vision_layers: int = 3,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 96,
    vision_aspect_ratio: str = "anyres_max_2",
    seed: int = 0,
):
    """A random ``LlavaOnevisionForConditionalGeneration`` in eval mode: SigLIP tower (no CLS token,
    8 x 8 patches per tower input), Qwen2 decoder, crops of 1x2, 2x1 or 2x2 tower inputs; with
    ``anyres_max_2`` a 2x2 crops grid is resampled down (OneVision's default, ``anyres_max_9``, only
    does so past nine tower inputs). Image token id ``IMAGE_TOKEN_ID``, video ``VIDEO_TOKEN_ID``."""
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=vision_hidden,
        intermediate_size=4 * vision_hidden,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
    )
    text = Qwen2Config(**_text_config(hidden, layers, heads, kv_heads, intermediate, vocab))
    s = image_size
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=vision_aspect_ratio,
        image_grid_pinpoints=[[s, 2 * s], [2 * s, s], [2 * s, 2 * s]],
        pad_token_id=0,
    )
    return _finish(LlavaOnevisionForConditionalGeneration, config, attn, torch.float32, seed)


def tiny_qwen2_vl(
    *,
    attn: str = "sdpa",
    version: str = "2",
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 96,
    seed: int = 0,
):
    """A random ``Qwen2VLForConditionalGeneration`` (``version="2.5"``: ``Qwen2_5_VLForConditionalGeneration``,
    with windowed attention in all tower blocks but the last) in eval mode: 14 px patches merged 2x2,
    a decoder with M-RoPE, image token id ``IMAGE_TOKEN_ID``. An image of h x w patches (both even) is
    ``pixel_values`` (h * w, 1176) and an ``image_grid_thw`` row (1, h, w), and gives h * w / 4 visual
    tokens; prompts need ``mm_token_type_ids`` (1 at image tokens)."""
    import transformers

    if version == "2":
        vision = {"embed_dim": vision_hidden, "hidden_size": hidden, "mlp_ratio": 2}
        config_class, model_class = transformers.Qwen2VLConfig, transformers.Qwen2VLForConditionalGeneration
    elif version == "2.5":
        vision = {"hidden_size": vision_hidden, "out_hidden_size": hidden, "intermediate_size": 2 * vision_hidden}
        vision.update({"window_size": 56, "fullatt_block_indexes": [vision_layers - 1]})
        config_class, model_class = transformers.Qwen2_5_VLConfig, transformers.Qwen2_5_VLForConditionalGeneration
    else:
        raise ValueError(f"version must be '2' or '2.5', got {version!r}")
    vision.update({"depth": vision_layers, "num_heads": vision_heads, "patch_size": 14})
    vision.update({"spatial_merge_size": 2, "temporal_patch_size": 2})
    half = hidden // heads // 2  # rotary frequencies per head, shared by time, height and width
    spatial = (half - half // 4) // 2
    text = _text_config(hidden, layers, heads, kv_heads, intermediate, vocab)
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [half - 2 * spatial, spatial, spatial],
    }
    config = config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=29,
        pad_token_id=0,
    )
    return _finish(model_class, config, attn, torch.float32, seed)
