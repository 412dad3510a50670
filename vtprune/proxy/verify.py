"""Checks that the assembled proxy is what it claims to be (used by scripts/build_proxy.py and the tests)."""

from __future__ import annotations

import torch

from vtprune.proxy import data
from vtprune.proxy import prompt as fmt
from vtprune.proxy.tower import tower_max_abs_diff


def verify_proxy(model, processor, split: str = "test", image_id: int = 0) -> dict:
    """Facts about ``model``/``processor`` on one easy-vqa image:

    - ``tower_max_abs_diff``: {"last_block", "final_norm"} max abs difference between the model's tower
      and the ONNX backbone run by onnxruntime, on the processor's (1, 3, 224, 224) pixels;
    - ``processor_image_tokens``: how many ``<image>`` placeholders the processor writes for one image;
    - ``model_image_tokens``: how many feature rows ``get_image_features`` returns for it;
    - ``feature_width``: their width (the language model's hidden size).
    """
    image = data.load_image(split, image_id)
    inputs = processor(images=[image], text=[fmt.prompt("What shape is in the image?")], return_tensors="pt")
    pixels = inputs["pixel_values"].to(model.dtype)
    placeholders = int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=pixels)
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    features = features[0]  # the one image's (256, H) rows, from a per-image tuple or a (1, 256, H) tensor
    return {
        "tower_max_abs_diff": tower_max_abs_diff(model.model.vision_tower, pixels),
        "processor_image_tokens": placeholders,
        "model_image_tokens": int(features.shape[0]),
        "feature_width": int(features.shape[-1]),
    }
