"""A disk cache of tower features for easy-vqa images: the tower is frozen, so each image runs once.

One float32 ``numpy.memmap`` per split of shape (N images, 256, 384): the last encoder block's output
without the CLS token, exactly what ``LlavaModel.get_image_features`` feeds the projector (fp32 keeps
it bit-identical to the model path). A (N,) uint8 memmap marks the rows already computed, so an
interrupted run resumes and images are only computed when first used.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from vtprune.proxy import data


def tower_features(model, processor, images) -> torch.Tensor:
    """(B, 256, 384) float32 features of PIL ``images``, selected as the model's config says."""
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].to(model.dtype)
    config = model.config
    with torch.no_grad():
        out = model.model.vision_tower(pixel_values=pixels, output_hidden_states=True)
    if not isinstance(config.vision_feature_layer, int):
        raise TypeError("feature caching expects a single (int) vision_feature_layer")
    hidden = out.hidden_states[config.vision_feature_layer]
    return (hidden[:, 1:] if config.vision_feature_select_strategy == "default" else hidden).float()


class FeatureCache:
    """Tower features of one easy-vqa split, computed on first use and kept on disk under ``root``."""

    def __init__(self, root: str | Path, split: str, num_images: int, tokens: int = 256, width: int = 384):
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.split = split
        shape = (num_images, tokens, width)
        values, done = root / f"{split}-features-f32.npy", root / f"{split}-done.npy"
        mode = "r+" if values.is_file() and done.is_file() else "w+"
        self.values = np.lib.format.open_memmap(values, mode=mode, dtype=np.float32, shape=shape)
        self.done = np.lib.format.open_memmap(done, mode=mode, dtype=np.uint8, shape=(num_images,))
        if self.values.shape != shape:
            raise ValueError(f"{values} holds {self.values.shape}, expected {shape}; delete it to rebuild")

    def get(self, image_ids, model, processor, batch_size: int = 16) -> torch.Tensor:
        """(len(image_ids), 256, 384) float32 features, computing (and storing) the missing ones."""
        ids = [int(i) for i in image_ids]
        todo = sorted({i for i in ids if not self.done[i]})
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            feats = tower_features(model, processor, [data.load_image(self.split, i) for i in chunk])
            self.values[chunk] = feats.numpy()
            self.done[chunk] = 1
        if todo:
            self.values.flush()
            self.done.flush()
        return torch.from_numpy(np.array(self.values[ids]))

    @property
    def count_done(self) -> int:
        return int(self.done.sum())
