"""Randomly initialised LLaVA models built from configs: for tests, the demo and the benchmarks.

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


@torch.no_grad()
def image_token_counts(model, **image_inputs) -> list[int]:
    """Placeholder tokens of each image, from the model's own feature packing (any family)."""
    features = model.model.get_image_features(**image_inputs, return_dict=True).pooler_output
    return [int(f.shape[0]) for f in features]


@torch.no_grad()
def video_token_counts(model, **video_inputs) -> list[int]:
    """Placeholder tokens of each video, from the model's own video features (any family)."""
    features = model.model.get_video_features(**video_inputs, return_dict=True).pooler_output
    return [int(f.shape[0]) for f in features]


def tokens_per_image(model) -> int:
    vision = model.config.vision_config
    n = (vision.image_size // vision.patch_size) ** 2
    return n if model.config.vision_feature_select_strategy == "default" else n + 1


def make_prompt(model, text_before: list[int], text_after: list[int], images: int = 1) -> list[int]:
    """Token ids: ``text_before``, one placeholder run per image, ``text_after``."""
    return text_before + [IMAGE_TOKEN_ID] * (tokens_per_image(model) * images) + text_after


def batch_inputs(model, prompts: list[list[int]], images: int | None = None, seed: int = 0) -> dict:
    """Left-padded batch of prompts with random pixel values for every image they contain."""
    longest = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), longest, dtype=torch.long)
    mask = torch.zeros(len(prompts), longest, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p) :] = torch.tensor(p)
        mask[i, longest - len(p) :] = 1
    n_images = images if images is not None else int((ids == IMAGE_TOKEN_ID).sum()) // tokens_per_image(model)
    size = model.config.vision_config.image_size
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 3, size, size, generator=generator).to(model.dtype)
    out = {"input_ids": ids, "attention_mask": mask}
    if n_images:
        out["pixel_values"] = pixels
    return out


def surviving_positions(ids: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """(L,) bool over a prompt ``ids`` (L,): every text token, and the image tokens whose index in the
    prompt's visual-token sequence is in ``kept``. The manual reference for a shortened prompt."""
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    dropped = torch.ones(image.numel(), dtype=torch.bool)
    dropped[kept] = False
    keep = torch.ones(ids.numel(), dtype=torch.bool)
    keep[image[dropped]] = False
    return keep


# A chat template of the llava-1.5-hf shape: "USER: <image>\n{question} ASSISTANT:".
_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
_WORDS = (
    "USER ASSISTANT : ? . , what which is are the a an in on of this that image picture photo shown show "
    "describe colour color shape red green blue yellow black white gray orange circle square triangle "
    "rectangle cat dog person man woman yes no there it A B C D"
).split()


def word_tokenizer(specials: list[str], words=_WORDS):
    """A word-level fast tokenizer (left padding) over ``words`` with ``<s>``, ``</s>``, ``<unk>``,
    ``<pad>`` and the model's own special tokens; returns it and its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<pad>", *specials, *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=specials,
        padding_side="left",
    )
    return tokenizer, vocab


def save_tiny_llava_hf(directory, *, attn: str = "sdpa"):
    """Write a random tiny LLaVA in the llava-hf checkpoint layout to ``directory``: config and weights,
    a word-level tokenizer with ``<image>`` and a chat template, and a CLIP image processor (336 px),
    so ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load it
    like a real checkpoint. Returns the directory."""
    from pathlib import Path

    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer, vocab = word_tokenizer(["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        chat_template=_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=1,
    )
    model = tiny_llava(attn=attn, vocab=len(vocab), image_token_id=vocab["<image>"])
    model.config.pad_token_id = model.config.text_config.pad_token_id = vocab["<pad>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def _save(model, processor, directory, vocab):
    from pathlib import Path

    model.config.pad_token_id = vocab["<pad>"]
    if hasattr(model.config, "text_config"):
        model.config.text_config.pad_token_id = vocab["<pad>"]
    model.generation_config.pad_token_id = vocab["<pad>"]
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def tiny_llava_next_processor():
    """(``LlavaNextProcessor``, vocabulary) for ``tiny_llava_next``: anyres crops of 112 px tower inputs,
    a word-level tokenizer with ``<image>`` and a chat template."""
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    tokenizer, vocab = word_tokenizer(["<image>"])
    images = LlavaNextImageProcessor(
        size={"shortest_edge": 112},
        crop_size={"height": 112, "width": 112},
        image_grid_pinpoints=[[112, 224], [224, 112], [224, 224]],
    )
    processor = LlavaNextProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=_CHAT_TEMPLATE,
    )
    return processor, vocab


def save_tiny_llava_next_hf(directory, *, attn: str = "sdpa"):
    """Write a random tiny LLaVA-NeXT with its processor to ``directory`` (see ``save_tiny_llava_hf``)."""
    processor, vocab = tiny_llava_next_processor()
    model = tiny_llava_next(attn=attn, vocab=len(vocab))
    model.config.image_token_id = vocab["<image>"]
    return _save(model, processor, directory, vocab)


_QWEN_CHAT_TEMPLATE = _CHAT_TEMPLATE.replace("<image>\n", "<|vision_start|><|image_pad|><|vision_end|>")


def tiny_qwen2_vl_processor():
    """(``Qwen2VLProcessor``, vocabulary) for ``tiny_qwen2_vl``: its own image and video processors, a
    word-level tokenizer with Qwen's vision tokens and a chat template; prompts carry
    ``<|vision_start|> ... <|vision_end|>`` and ``mm_token_type_ids``."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    tokenizer, vocab = word_tokenizer(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    tokenizer.image_token, tokenizer.video_token = "<|image_pad|>", "<|video_pad|>"
    images = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=224 * 224)
    processor = Qwen2VLProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=_QWEN_CHAT_TEMPLATE,
    )
    return processor, vocab


def tiny_qwen2_vl_for(vocab, **options):
    """``tiny_qwen2_vl`` with the token ids of ``tiny_qwen2_vl_processor``'s vocabulary."""
    model = tiny_qwen2_vl(vocab=len(vocab), **options)
    model.config.image_token_id = vocab["<|image_pad|>"]
    model.config.video_token_id = vocab["<|video_pad|>"]
    model.config.vision_start_token_id = vocab["<|vision_start|>"]
    return model


def save_tiny_qwen2_vl_hf(directory, *, attn: str = "sdpa", version: str = "2"):
    """Write a random tiny Qwen2-VL (``version="2.5"``: Qwen2.5-VL) with its processor to ``directory``."""
    processor, vocab = tiny_qwen2_vl_processor()
    return _save(tiny_qwen2_vl_for(vocab, attn=attn, version=version), processor, directory, vocab)
