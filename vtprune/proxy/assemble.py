"""Assembly: tower + projector + language model as a ``LlavaForConditionalGeneration`` and its processor.

- Features: the last encoder block's output, before the tower's final LayerNorm
  (``vision_feature_layer=-1`` selects ``hidden_states[-1]``), without the CLS token
  (``vision_feature_select_strategy="default"``).
- Projector: LLaVA-1.5's 2-layer GELU MLP, 384 -> 576 -> 576; the only trained part.
- Images: resized to 224x224 (bicubic), ImageNet mean/std -> 16x16 = 256 visual tokens per image; the
  processor expands each ``<image>`` to 256 placeholders (16*16 + 1 CLS - 1 dropped).
"""

from __future__ import annotations

import torch

from vtprune.proxy import prompt as fmt
from vtprune.proxy.tower import IMAGENET_MEAN, IMAGENET_STD, ONNX_INPUT_SIZE

IMAGE_SIZE = ONNX_INPUT_SIZE  # 224: what the processor feeds the tower
TOKENS_PER_IMAGE = (IMAGE_SIZE // 14) ** 2  # 256


def add_image_token(tokenizer) -> int:
    """Add ``<image>`` as a special token (idempotent); returns its id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [fmt.IMAGE_TOKEN]})
    ids = tokenizer.encode(fmt.IMAGE_TOKEN, add_special_tokens=False)
    if len(ids) != 1:
        raise RuntimeError(f"{fmt.IMAGE_TOKEN!r} did not become a single token: {ids}")
    return ids[0]


def build_llava(tower, language_model, image_token_id: int, vocab_size: int, seed: int = 0):
    """A ``LlavaForConditionalGeneration`` (float32, eval) around a ``Dinov2Model`` and a ``LlamaForCausalLM``.

    The embedding matrix (tied to the LM head) grows to ``vocab_size``; the new rows are the mean of
    the old ones (deterministic; the ``<image>`` row is never read as an input, since image features
    replace it). The projector is initialised from ``seed``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    if type(tower).__name__ != "Dinov2Model":
        raise TypeError(f"tower must be a Dinov2Model, got {type(tower).__name__}")
    if type(language_model).__name__ != "LlamaForCausalLM":
        raise TypeError(f"language_model must be a LlamaForCausalLM, got {type(language_model).__name__}")
    old_vocab = language_model.config.vocab_size
    if not old_vocab <= image_token_id < vocab_size:
        raise ValueError(f"image_token_id {image_token_id} must be a new id in [{old_vocab}, {vocab_size})")

    text_config = language_model.config
    config = LlavaConfig(
        vision_config=tower.config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=text_config.tie_word_embeddings,
        pad_token_id=text_config.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(tower.state_dict())
    model.model.language_model.load_state_dict(language_model.model.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(language_model.lm_head.state_dict())
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        embeddings = model.get_input_embeddings().weight
        embeddings[old_vocab:] = embeddings[:old_vocab].mean(0)
    model.tie_weights()
    model.generation_config.pad_token_id = text_config.pad_token_id
    model.generation_config.eos_token_id = text_config.eos_token_id
    return model.eval()


def build_processor(tokenizer):
    """A ``LlavaProcessor``: 224x224 bicubic resize, ImageNet mean/std, ``<image>`` -> 256 placeholders."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessor(
        size=size,
        crop_size=size,  # read by LlavaProcessor to count tokens; no crop is done
        do_center_crop=False,
        do_resize=True,
        resample=3,  # PIL.Image.BICUBIC
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )
    add_image_token(tokenizer)
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, dropped by the "default" strategy
        image_token=fmt.IMAGE_TOKEN,
        chat_template=fmt.CHAT_TEMPLATE,
    )
