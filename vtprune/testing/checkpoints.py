"""Tiny models saved in the Hugging Face checkpoint layout (config, weights, tokenizer, processor), so
``from_pretrained`` loads them like real checkpoints: for the quickstart, the lmms-eval model and the
profiler's tests, all offline."""

from __future__ import annotations

from vtprune.testing.models import tiny_llava, tiny_llava_next, tiny_qwen2_vl
from vtprune.testing.timm_vlms import tiny_fast_vlm, tiny_perception_lm

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


def word_tokenizer(specials: list[str], words=_WORDS, named: dict | None = None):
    """A word-level fast tokenizer (left padding) over ``words`` with ``<s>``, ``</s>``, ``<unk>``,
    ``<pad>`` and the model's own special tokens; returns it and its vocabulary. ``named``: special
    tokens the processor reads as attributes (``{"image_token": ...}`` gives ``tokenizer.image_token``
    and ``tokenizer.image_token_id``), added after ``specials``."""
    named = named or {}
    if named and specials:
        raise ValueError("word_tokenizer: give specials or named special tokens, not both")
    specials = [*specials, *named.values()]
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
        padding_side="left",
        **({"extra_special_tokens": named} if named else {"additional_special_tokens": specials}),
    )
    return tokenizer, vocab


def save_tiny_llava_hf(directory, *, attn: str = "sdpa", **sizes):
    """Write a random tiny LLaVA in the llava-hf checkpoint layout to ``directory``: config and weights,
    a word-level tokenizer with ``<image>`` and a chat template, and a CLIP image processor (336 px),
    so ``LlavaForConditionalGeneration.from_pretrained`` and ``AutoProcessor.from_pretrained`` load it
    like a real checkpoint. ``sizes``: ``tiny_llava``'s size options (e.g. ``heads=2`` for vLLM's CPU
    attention, which needs a head size of 32 or more). Returns the directory."""
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
    model = tiny_llava(attn=attn, vocab=len(vocab), image_token_id=vocab["<image>"], **sizes)
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


def save_tiny_llava_next_hf(directory, *, attn: str = "sdpa", **sizes):
    """Write a random tiny LLaVA-NeXT with its processor to ``directory`` (see ``save_tiny_llava_hf``;
    ``sizes``: ``tiny_llava_next``'s size options)."""
    processor, vocab = tiny_llava_next_processor()
    model = tiny_llava_next(attn=attn, vocab=len(vocab), **sizes)
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


def save_tiny_qwen2_vl_hf(directory, *, attn: str = "sdpa", version: str = "2", **sizes):
    """Write a random tiny Qwen2-VL (``version="2.5"``: Qwen2.5-VL) with its processor to ``directory``
    (``sizes``: ``tiny_qwen2_vl``'s size options, e.g. ``hidden=128`` for vLLM's CPU attention)."""
    processor, vocab = tiny_qwen2_vl_processor()
    return _save(tiny_qwen2_vl_for(vocab, attn=attn, version=version, **sizes), processor, directory, vocab)


def save_tiny_fast_vlm_hf(directory, *, attn: str = "sdpa"):
    """Write a random tiny FastVLM (``tiny_fast_vlm``) with a LLaVA processor to ``directory``: 256 px
    images, one ``<image>`` token per 64 px square (16 per image)."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    tokenizer, vocab = word_tokenizer(["<image>"])
    images = CLIPImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 256, "width": 256})
    processor = LlavaProcessor(
        image_processor=images,
        tokenizer=tokenizer,
        patch_size=64,  # what LlavaProcessor divides the image by: FastViT-HD's downsampling
        vision_feature_select_strategy="full",
        chat_template=_CHAT_TEMPLATE,
        image_token="<image>",
        num_additional_image_tokens=0,
    )
    model = tiny_fast_vlm(attn=attn, vocab=len(vocab))
    model.config.image_token_id = vocab["<image>"]
    return _save(model, processor, directory, vocab)


def save_tiny_perception_lm_hf(directory, *, attn: str = "sdpa"):
    """Write a random tiny PerceptionLM (``tiny_perception_lm`` on 56 px tiles) with its processor to
    ``directory``: an image is a thumbnail and up to two tiles, a video its frames, 4 tokens each."""
    from transformers import PerceptionLMImageProcessor, PerceptionLMProcessor, PerceptionLMVideoProcessor

    tokenizer, vocab = word_tokenizer([], named={"image_token": "<|image|>", "video_token": "<|video|>"})
    processor = PerceptionLMProcessor(
        image_processor=PerceptionLMImageProcessor(tile_size=56, max_num_tiles=2),
        video_processor=PerceptionLMVideoProcessor(size={"height": 56, "width": 56}),
        tokenizer=tokenizer,
        patch_size=14,
        pooling_ratio=2,
        chat_template=_CHAT_TEMPLATE.replace("<image>\n", "<|image|>\n"),
    )
    model = tiny_perception_lm(attn=attn, vocab=len(vocab))
    model.config.image_token_id, model.config.video_token_id = vocab["<|image|>"], vocab["<|video|>"]
    return _save(model, processor, directory, vocab)


def nest_vision_model_keys(directory):
    """Rewrite a saved checkpoint's CLIP/SigLIP tower weights from transformers 5's flat names
    (``vision_tower.encoder...``) to the nested ones the Hub's llava-hf checkpoints carry
    (``vision_tower.vision_model.encoder...``), which transformers still loads and vLLM 0.32
    requires. Returns the directory."""
    from pathlib import Path

    from safetensors.torch import load_file, save_file

    directory = Path(directory)
    for path in directory.glob("*.safetensors"):
        weights = load_file(path)
        save_file({_nested(k): v for k, v in weights.items()}, path, metadata={"format": "pt"})
    return directory


def _nested(key: str) -> str:
    # transformers saves the tower as "vision_tower.*" (5.19) or "model.vision_tower.*" (later releases).
    for prefix in ("model.vision_tower.", "vision_tower."):
        if key.startswith(prefix) and not key.startswith(prefix + "vision_model."):
            return prefix + "vision_model." + key[len(prefix) :]
    return key
