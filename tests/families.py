"""Model families in the test matrix: how to build a tiny one and feed it images.

Adding a family to the matrix is adding a ``Family`` here (and to ``FAMILIES``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache, partial

import torch

from vtprune.testing import (
    IMAGE_TOKEN_ID,
    VIDEO_TOKEN_ID,
    image_token_counts,
    tiny_fast_vlm,
    tiny_llava,
    tiny_llava_next,
    tiny_llava_next_video,
    tiny_llava_onevision,
    tiny_perception_lm,
    tiny_qwen2_vl,
    video_token_counts,
)


@dataclass(frozen=True)
class Family:
    name: str
    build: object  # (attn) -> model
    image_shape: tuple[int, ...]  # one image's pixel_values
    sizes: tuple = ()  # image_sizes the images cycle through (families with anyres inputs)
    video_shape: tuple = ()  # one video's pixel_values_videos (families with videos)

    def model(self, attn: str = "sdpa"):
        return _model(self, attn)

    def images(self, n: int, first: int = 0) -> dict:
        """Per-image inputs of images first..first+n-1 (the same pixels for the same index)."""
        pixels = torch.stack(
            [
                torch.randn(self.image_shape, generator=torch.Generator().manual_seed(100 + i))
                for i in range(first, first + n)
            ]
        )
        out = {"pixel_values": pixels}
        if self.sizes:
            out["image_sizes"] = torch.tensor([self.sizes[i % len(self.sizes)] for i in range(first, first + n)])
        return out

    def videos(self, n: int, first: int = 0) -> dict:
        """Per-video inputs of videos first..first+n-1 (the same pixels for the same index)."""
        pixels = [
            torch.randn(self.video_shape, generator=torch.Generator().manual_seed(500 + i))
            for i in range(first, first + n)
        ]
        return {"pixel_values_videos": torch.stack(pixels)}

    def batch(self, model, samples: list[tuple]) -> tuple[dict, list[dict]]:
        """Left-padded inputs for samples (text before, text after, images[, videos]; images come
        first), and each sample alone."""
        per_sample, first, first_video = [], 0, 0
        for before, after, n, *more in samples:
            v = more[0] if more else 0
            images = self.images(n, first) if n else {}
            videos = self.videos(v, first_video) if v else {}
            counts = [(IMAGE_TOKEN_ID, c) for c in image_token_counts(model, **images)] if n else []
            counts += [(VIDEO_TOKEN_ID, c) for c in video_token_counts(model, **videos)] if v else []
            # a text token between images, as chat templates put (Qwen2-VL's M-RoPE needs it)
            ids = before + [t for token, c in counts for t in [token] * c + [3]][:-1] + after
            per_sample.append(
                {
                    "input_ids": torch.tensor([ids]),
                    "attention_mask": torch.ones(1, len(ids), dtype=torch.long),
                    **images,
                    **videos,
                }
            )
            first += n
            first_video += v
        longest = max(s["input_ids"].shape[1] for s in per_sample)
        ids = torch.zeros(len(samples), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(per_sample):
            ids[i, longest - s["input_ids"].shape[1] :] = s["input_ids"][0]
            mask[i, longest - s["input_ids"].shape[1] :] = 1
        batch = {"input_ids": ids, "attention_mask": mask}
        if first:
            batch.update(self.images(first))
        if first_video:
            batch.update(self.videos(first_video))
        for inputs in [batch, *per_sample]:
            inputs.update(self.token_types(inputs["input_ids"]))
        return batch, per_sample

    def token_types(self, ids: torch.Tensor) -> dict:
        """Per-token inputs a family's prompts need besides input_ids (none by default)."""
        return {}

    def image_features(self, model, inputs: dict) -> list[torch.Tensor]:
        """Each image's (n_tokens, D) tokens as the model scatters them, from its own encoder."""
        image = {k: v for k, v in inputs.items() if k in ("pixel_values", "image_sizes", "image_grid_thw")}
        with torch.no_grad():
            return list(model.model.get_image_features(**image, return_dict=True).pooler_output)

    def video_features(self, model, inputs: dict) -> list[torch.Tensor]:
        """Each video's (n_tokens, D) tokens as the model scatters them, from its own encoder."""
        video = {k: v for k, v in inputs.items() if k in ("pixel_values_videos", "video_grid_thw")}
        with torch.no_grad():
            return list(model.model.get_video_features(**video, return_dict=True).pooler_output)


@dataclass(frozen=True)
class PerceptionLMFamily(Family):
    """Images of a thumbnail and tiles: the encoder gives one row per crop, an image is its crops' rows."""

    def image_features(self, model, inputs: dict) -> list[torch.Tensor]:
        return _by_item(model, inputs["pixel_values"])

    def video_features(self, model, inputs: dict) -> list[torch.Tensor]:
        return _by_item(model, inputs["pixel_values_videos"])  # one method for both: frames are crops


def _by_item(model, pixels: torch.Tensor) -> list[torch.Tensor]:
    """PerceptionLM's encoder output for (items, crops, 3, H, W) pixels, as one (n_tokens, D) per item."""
    with torch.no_grad():
        rows = model.model.get_image_features(pixel_values=pixels, return_dict=True).pooler_output
    return list(rows.reshape(pixels.shape[0], -1, rows.shape[-1]))


@dataclass(frozen=True)
class Qwen2VLFamily(Family):
    """Images of h x w patches: pixel_values concatenated over images, one image_grid_thw row each."""

    def images(self, n: int, first: int = 0) -> dict:
        grids = [self.sizes[i % len(self.sizes)] for i in range(first, first + n)]
        pixels = [
            torch.randn(h * w, self.image_shape[0], generator=torch.Generator().manual_seed(100 + i))
            for i, (h, w) in zip(range(first, first + n), grids)
        ]
        return {"pixel_values": torch.cat(pixels), "image_grid_thw": torch.tensor([[1, h, w] for h, w in grids])}

    def videos(self, n: int, first: int = 0) -> dict:
        """Videos of (t, h, w) = ``video_shape`` patches (t temporal patches of 2 frames each)."""
        t, h, w = self.video_shape
        pixels = [
            torch.randn(t * h * w, self.image_shape[0], generator=torch.Generator().manual_seed(500 + i))
            for i in range(first, first + n)
        ]
        return {"pixel_values_videos": torch.cat(pixels), "video_grid_thw": torch.tensor([[t, h, w]] * n)}

    def token_types(self, ids: torch.Tensor) -> dict:
        return {"mm_token_type_ids": (ids == IMAGE_TOKEN_ID).int() + 2 * (ids == VIDEO_TOKEN_ID).int()}


@cache
def _model(family: Family, attn: str):
    return family.build(attn=attn)


NEXT_SIZES = ((60, 200), (150, 100), (200, 200))  # 60x200 is unpadded (rows removed), 2x1 crops, 2x2 crops
ONEVISION_SIZES = ((200, 200), (60, 200), (150, 100))  # 200x200's 2x2 crops grid is resampled (anyres_max_2)
QWEN_SIZES = ((16, 20), (12, 12), (20, 8))  # in patches (h, w): 16 x 20 patches -> 8 x 10 = 80 visual tokens
LLAVA_VIDEO = (4, 3, 112, 112)  # 4 frames of 8 x 8 patches, pooled to 4 x 4 tokens each
QWEN_VIDEO = (2, 8, 8)  # 4 frames = 2 temporal patches of 8 x 8 patches: 2 x 4 x 4 tokens
PLM_IMAGE = (3, 3, 112, 112)  # a thumbnail and two tiles of 8 x 8 patches, each pooled to 4 x 4 tokens
PLM_VIDEO = (4, 3, 112, 112)  # 4 frames of 8 x 8 patches, pooled to 4 x 4 tokens each

FAMILIES = (
    Family("llava", tiny_llava, (3, 336, 336)),
    Family("llava_next", tiny_llava_next, (5, 3, 112, 112), sizes=NEXT_SIZES),
    # SigLIP (no CLS token)
    Family("llava_onevision", tiny_llava_onevision, (5, 3, 112, 112), ONEVISION_SIZES, LLAVA_VIDEO),
    Qwen2VLFamily("qwen2_vl", tiny_qwen2_vl, (1176,), QWEN_SIZES, QWEN_VIDEO),
    Qwen2VLFamily("qwen2_5_vl", partial(tiny_qwen2_vl, version="2.5"), (1176,), QWEN_SIZES, QWEN_VIDEO),
    # timm towers: FastViT-HD (no CLS; 384 px -> 6 x 6 tokens), Perception Encoder (CLS, RoPE)
    Family("fast_vlm", tiny_fast_vlm, (3, 384, 384)),
    PerceptionLMFamily("perception_lm", partial(tiny_perception_lm, tile=112), PLM_IMAGE, video_shape=PLM_VIDEO),
)
# Families with video inputs (LLaVA-NeXT-Video's images are LLaVA-NeXT's).
VIDEO_FAMILIES = (
    Family("llava_next_video", tiny_llava_next_video, (5, 3, 112, 112), NEXT_SIZES, LLAVA_VIDEO),
    *[f for f in FAMILIES if f.video_shape],
)


def packed_sources(model, inputs, n_inputs: int) -> list:
    """For each packed token of image 0: (tower input, patch position) it came from, or None for a
    newline; found by matching the packed features against each tower input's projected patches
    (images whose crops are not resampled; ``n_inputs``: the image's tower inputs)."""
    with torch.no_grad():
        packed = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"], return_dict=True
        ).pooler_output[0]
        hidden = model.model.vision_tower(inputs["pixel_values"][0, :n_inputs], output_hidden_states=True)
        selected = hidden.hidden_states[model.config.vision_feature_layer]
        if model.config.vision_feature_select_strategy == "default":
            selected = selected[:, 1:]
        projected = model.model.multi_modal_projector(selected)  # (inputs, patches, D)
    flat = projected.reshape(-1, projected.shape[-1])
    sources = []
    for token in packed:
        match = (flat == token).all(-1).nonzero().flatten()
        sources.append(None if match.numel() == 0 else divmod(int(match[0]), projected.shape[1]))
    return sources


def assert_processor_batches_prune_like_single_prompts(
    model, processor, texts, pictures, keep=0.25, kind="images"
) -> tuple:
    """With a family's own processor: keep-all equals unpruned on a padded batch, and under divprune
    and fastv the batch generates what each prompt does alone. ``kind``: the processor argument the
    pictures go to ("images" or "videos"). Returns the batch and, per pruner, ``handle.last.kept_counts``
    of the batch."""
    import vtprune

    batch = processor(**{kind: pictures}, text=texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        unpruned = model.generate(**batch, max_new_tokens=8, do_sample=False)
        with vtprune.apply(model, "divprune", keep=1.0):
            assert torch.equal(model.generate(**batch, max_new_tokens=8, do_sample=False), unpruned)
    kept = {}
    for name in ("divprune", "fastv"):
        with vtprune.apply(model, name, keep=keep) as handle, torch.no_grad():
            together = model.generate(**batch, max_new_tokens=8, do_sample=False)
            kept[name] = handle.last.kept_counts
            for i, (text, picture) in enumerate(zip(texts, pictures)):
                single = processor(**{kind: [picture]}, text=[text], return_tensors="pt")
                alone = model.generate(**single, max_new_tokens=8, do_sample=False)
                assert torch.equal(together[i, -8:], alone[0, -8:]), (name, i)
    return batch, kept


def assert_sdpa_equals_eager(family, name, samples, **options) -> None:
    """Under pruner ``name``, the family's SDPA and eager models keep the same tokens, give the same
    logits and generate the same tokens."""
    from helpers import apply, greedy, logits

    results = []
    for attn in ("sdpa", "eager"):
        model = family.model(attn)
        inputs, _ = family.batch(model, samples)
        with apply(model, name, **options) as handle:
            results.append((logits(model, inputs), handle.last.kept[0], greedy(model, inputs)))
    (sdpa_logits, sdpa_kept, sdpa_tokens), (eager_logits, eager_kept, eager_tokens) = results
    assert torch.equal(sdpa_kept, eager_kept)
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-4, rtol=0)
    assert torch.equal(sdpa_tokens, eager_tokens)
