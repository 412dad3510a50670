"""Tiny VLMs whose vision tower is a timm model behind transformers' ``TimmWrapperModel``: FastVLM
(a FastViT-HD tower) and PerceptionLM (a Perception Encoder tower). Built from configs with
``pretrained=False`` weights: nothing downloads.

timm's attention modules ignore ``attn_implementation``; the builders set timm's own switch
(``fused_attn``) from ``attn``, so an ``"eager"`` model is eager in its tower too.
"""

from __future__ import annotations

import torch

from vtprune.testing.models import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, _finish, _llama_config, _text_config


def tiny_fast_vlm(
    *,
    attn: str = "sdpa",
    embed_dims: tuple[int, ...] = (8, 16, 32, 32, 64),
    blocks: tuple[int, ...] = (1, 1, 1, 1, 2),
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    vocab: int = 96,
    seed: int = 0,
):
    """A random ``FastVlmForConditionalGeneration`` in eval mode: timm's ``fastvit_mci3`` (FastViT-HD)
    with three convolutional stages and two attention stages of ``blocks`` blocks each (the last stage's
    are the tower layers pruners read), and a Qwen2 decoder. The tower downsamples by 64 and
    has no CLS token: an image of s x s pixels (s a multiple of 64) gives (s / 64)^2 visual tokens in
    raster order (256 px: 16), image token id ``IMAGE_TOKEN_ID``."""
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, Qwen2Config, TimmWrapperConfig

    if len(embed_dims) != 5 or any(d % 32 for d in embed_dims[3:]):
        raise ValueError(f"embed_dims: five widths, the two attention stages' multiples of 32, got {embed_dims}")
    if len(blocks) != 5 or min(blocks) < 1:
        raise ValueError(f"blocks: five stages of at least one block each, got {blocks}")
    vision = TimmWrapperConfig(
        architecture="fastvit_mci3",
        do_pooling=False,  # the classifier head's output is discarded by FastVLM anyway
        hidden_size=2 * embed_dims[-1],  # the final convolution doubles the last stage's width
        model_args={"inference_mode": True, "layers": tuple(blocks), "embed_dims": tuple(embed_dims)},
    )
    text = Qwen2Config(**_text_config(hidden, layers, heads, kv_heads, intermediate, vocab))
    config = FastVlmConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_TOKEN_ID)
    return _timm_tower(_finish(FastVlmForConditionalGeneration, config, attn, torch.float32, seed), attn, seed)


def tiny_perception_lm(
    *,
    attn: str = "sdpa",
    tile: int = 56,
    pooling: int = 2,
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
    """A random ``PerceptionLMForConditionalGeneration`` in eval mode: timm's Perception Encoder
    (``vit_pe_lang``: a CLS token, RoPE, 14 px patches) on ``tile`` x ``tile`` crops, the CLS dropped,
    the projector's output average-pooled ``pooling`` x ``pooling``, and a Llama decoder. Each crop (an
    image's thumbnail and tiles, thumbnail first; a video's frames) gives (tile / 14 / pooling)^2 visual
    tokens (56 px, pooling 2: 4); ``pixel_values`` is (images, crops, 3, tile, tile), image and video
    token ids ``IMAGE_TOKEN_ID`` and ``VIDEO_TOKEN_ID``."""
    from transformers import PerceptionLMConfig, PerceptionLMForConditionalGeneration, TimmWrapperConfig

    if tile % 14 or (tile // 14) % pooling:
        raise ValueError(f"tile must be a multiple of 14 * pooling = {14 * pooling}, got {tile}")
    vision = TimmWrapperConfig(
        architecture="vit_pe_lang_large_patch14_448",
        do_pooling=False,
        model_args={"embed_dim": vision_hidden, "depth": vision_layers, "num_heads": vision_heads, "img_size": tile},
    )
    config = PerceptionLMConfig(
        text_config=_llama_config(hidden, layers, heads, kv_heads, intermediate, vocab),
        vision_config=vision,
        projector_pooling_ratio=pooling,
        vision_use_cls_token=True,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
    )
    return _timm_tower(_finish(PerceptionLMForConditionalGeneration, config, attn, torch.float32, seed), attn, seed)


def _timm_tower(model, attn: str, seed: int):
    """timm initialises these towers for training (weights of std 0.02, layer scales of 1e-5), which at
    this size leaves every attention uniform and every token alike, so pruners would choose among
    ties: the tower's projections are drawn again with unit gain (std fan_in^-1/2), layer scales 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.model.vision_tower.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
                weight = torch.randn(module.weight.shape, generator=generator) * module.weight[0].numel() ** -0.5
                module.weight.copy_(weight)
            elif type(module).__name__.startswith("LayerScale"):
                for parameter in module.parameters():
                    parameter.fill_(1.0)
            if hasattr(module, "fused_attn"):
                module.fused_attn = attn != "eager"
    return model
