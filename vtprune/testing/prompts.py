"""Prompts and inputs for the tiny models: placeholder runs, left-padded batches with random pixels,
and the manual reference of a shortened prompt."""

from __future__ import annotations

import torch

from vtprune.testing.models import IMAGE_TOKEN_ID


@torch.no_grad()
def image_token_counts(model, **image_inputs) -> list[int]:
    """Placeholder tokens of each image, from the model's own feature packing (any family)."""
    features = model.model.get_image_features(**image_inputs, return_dict=True).pooler_output
    return _per_item([int(f.shape[0]) for f in features], image_inputs.get("pixel_values"))


@torch.no_grad()
def video_token_counts(model, **video_inputs) -> list[int]:
    """Placeholder tokens of each video, from the model's own video features (any family; PerceptionLM
    encodes videos with its image method, each frame a crop)."""
    if not hasattr(model.model, "get_video_features"):
        pixels = video_inputs["pixel_values_videos"]
        features = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
        return _per_item([int(f.shape[0]) for f in features], pixels)
    features = model.model.get_video_features(**video_inputs, return_dict=True).pooler_output
    return [int(f.shape[0]) for f in features]


def _per_item(counts: list[int], pixels) -> list[int]:
    """Per-row token counts as per-item counts where the encoder gave one row per crop (or frame) of
    (items, crops, 3, H, W) pixels (PerceptionLM) rather than one per item."""
    items = pixels.shape[0] if isinstance(pixels, torch.Tensor) and pixels.dim() == 5 else len(counts)
    if items == len(counts) or len(counts) % items:
        return counts
    per = len(counts) // items
    return [sum(counts[i * per : (i + 1) * per]) for i in range(items)]


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
