"""Model-family adapters: the only code that knows model classes."""

from __future__ import annotations

from vtprune.patches.adapter import nearest_transformers_class
from vtprune.patches.fast_vlm import FastVlmAdapter
from vtprune.patches.llava import LlavaAdapter
from vtprune.patches.llava_next import LlavaNextAdapter
from vtprune.patches.llava_next_video import LlavaNextVideoAdapter
from vtprune.patches.llava_onevision import LlavaOnevisionAdapter
from vtprune.patches.perception_lm import PerceptionLMAdapter
from vtprune.patches.qwen2_vl import Qwen2VLAdapter
from vtprune.patches.timm_vit import TimmViTAdapter

ADAPTERS = (
    LlavaAdapter,
    LlavaNextAdapter,
    LlavaNextVideoAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    FastVlmAdapter,
    PerceptionLMAdapter,
)


def supported_classes() -> list[str]:
    return [name for adapter in ADAPTERS for name in adapter.supported]


def adapter_for(model):
    for adapter in ADAPTERS:
        if adapter.supports(model):
            return adapter(model)
    if TimmViTAdapter.supports(model):  # a classifier, not a VLM: tower-stage pruners only
        return TimmViTAdapter(model)
    kind = type(model).__name__
    base = next((c.__name__ for c in type(model).__mro__[1:] if c.__name__ in supported_classes()), None)
    why = ""
    if base is not None:  # a transformers family built on a supported class (the adapters claim only exact ones)
        family = nearest_transformers_class(type(model))
        why = f" (transformers' {family} subclasses {base} but is another family: its own tower or layout)"
    raise TypeError(
        f"vtprune does not support {kind}{why}; supported model classes: {', '.join(supported_classes())}"
        f" (and, for tower-stage pruners such as vtprune.ToMe, timm's VisionTransformer)"
    )


def visual_token_counts(config, input_ids) -> list[int]:
    """Per row of ``input_ids`` (B, L), the image and video placeholder tokens (``config.image_token_id``,
    ``config.video_token_id``): the visual tokens before any pruning."""
    import torch

    visual = torch.zeros_like(input_ids, dtype=torch.bool)
    for name in ("image_token_id", "video_token_id"):
        token = getattr(config, name, None)
        if token is not None:
            visual |= input_ids == token
    return visual.sum(-1).tolist()
