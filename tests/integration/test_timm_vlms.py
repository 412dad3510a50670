"""FastVLM and PerceptionLM (timm towers): the tiny builders' layouts, and vtprune refusing both
until a family adapter claims them (issue 34)."""

import pytest
import torch
from helpers import hooks_of

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_fast_vlm, tiny_perception_lm


def _prompt(*runs: tuple[int, int]) -> torch.Tensor:
    """(1, L) ids: two text tokens, then each (token id, count) run followed by one text token."""
    ids = [1, 5]
    for token, count in runs:
        ids += [token] * count + [6]
    return torch.tensor([ids])


def test_fast_vlm_gives_one_token_per_64_pixels_square_and_generates():
    model = tiny_fast_vlm()
    pixels = torch.randn(1, 3, 256, 256)
    features = model.model.get_image_features(pixel_values=pixels).pooler_output
    assert features.shape == (1, 16, 64)
    ids = _prompt((IMAGE_TOKEN_ID, 16))
    out = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids), max_new_tokens=2)
    assert out.shape == (1, ids.shape[1] + 2)


def test_perception_lm_pools_every_crop_and_frame():
    model = tiny_perception_lm()
    image = torch.randn(1, 3, 3, 56, 56)  # a thumbnail and two tiles
    video = torch.randn(1, 4, 3, 56, 56)  # four frames
    assert model.model.get_image_features(pixel_values=image).pooler_output.shape == (3, 4, 64)
    ids = _prompt((IMAGE_TOKEN_ID, 12), (VIDEO_TOKEN_ID, 16))
    out = model(input_ids=ids, pixel_values=image, pixel_values_videos=video)
    assert out.logits.shape == (1, ids.shape[1], 96)


@pytest.mark.parametrize("build", [tiny_fast_vlm, tiny_perception_lm])
def test_timm_tower_vlms_are_refused_until_an_adapter_claims_them(build):
    model = build()
    with pytest.raises(TypeError, match=f"vtprune does not support {type(model).__name__}; supported model"):
        vtprune.apply(model, "divprune", keep=4)
    assert not hooks_of(model) and "forward" not in model.__dict__


def test_the_builders_refuse_layouts_their_towers_cannot_make():
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_fast_vlm(embed_dims=(8, 16, 32, 40, 64))
    with pytest.raises(ValueError, match=r"tile must be a multiple of 14 \* pooling = 28, got 42"):
        tiny_perception_lm(tile=42)
