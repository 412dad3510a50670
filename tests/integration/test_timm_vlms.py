"""FastVLM and PerceptionLM (timm towers): the tiny builders' layouts, the tower signals read from
timm's attention modules against the probabilities timm's own eager attention forms, the pooled and
tiled layouts the pruners see, and what is refused on these towers and why. The equivalence matrix
covers both families in test_families.py and test_video.py."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import vtprune
from vtprune.patches import towers
from vtprune.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, tiny_fast_vlm, tiny_perception_lm

CLOSE = {"atol": 1e-5, "rtol": 0}  # with sdpa, the blocks before a read one run fused


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


def _run_tower(model, pixels, handles) -> None:
    """One tower forward, then the hooks ``handles`` removed."""
    try:
        with torch.no_grad():
            model.model.vision_tower(pixels)
    finally:
        for h in handles:
            h.remove()


def _eager_probabilities(model, blocks, pixels) -> list[torch.Tensor]:
    """Per block, the (B, H, T, T) attention probabilities timm's eager path forms (its dropout's input)."""
    captured, handles = [], []
    for block in blocks:
        attention = getattr(block, "token_mixer", None) or block.attn
        assert not attention.fused_attn
        handles.append(attention.attn_drop.register_forward_hook(lambda m, i, out: captured.append(out.detach())))
    _run_tower(model, pixels, handles)
    return captured


def _content_keys(blocks, model, pixels) -> list[torch.Tensor]:
    """Per block, the head-mean keys (B, T, d) of its fused qkv projection, before any rotary term."""
    captured, handles = [], []
    for block in blocks:
        attention = getattr(block, "token_mixer", None) or block.attn

        def hook(module, inputs, out, heads=attention.num_heads):
            b, t = out.shape[:2]
            captured.append(out.reshape(b, t, 3, heads, -1)[:, :, 1].mean(2))

        handles.append(attention.qkv.register_forward_hook(hook))
    _run_tower(model, pixels, handles)
    return captured


def _read(model, layers, pixels) -> dict:
    reader = towers.TowerReader(model.model.vision_tower, layers, layers)
    handles = reader.install()
    try:
        with reader.reading() as read, torch.no_grad():
            model.model.vision_tower(pixels)
    finally:
        for h in handles:
            h.remove()
    return read


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_fastvit_signals_are_the_attention_each_token_receives_and_the_keys_of_its_last_stage(attn):
    reference, model = tiny_fast_vlm(attn="eager"), tiny_fast_vlm(attn=attn)  # same weights
    pixels = torch.randn(2, 3, 256, 320, generator=torch.Generator().manual_seed(0))
    blocks = reference.model.vision_tower.timm_model.stages[-1].blocks
    probabilities = _eager_probabilities(reference, blocks, pixels)
    keys = _content_keys(blocks, reference, pixels)
    read = _read(model, [0, 1], pixels)
    assert [p.shape for p in probabilities] == [(2, 2, 20, 20)] * 2  # a 4 x 5 grid, two heads
    for layer in (0, 1):
        torch.testing.assert_close(read["scores"][layer], probabilities[layer].mean(dim=(1, 2)), **CLOSE)
        torch.testing.assert_close(read["keys"][layer], keys[layer], **CLOSE)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_perception_encoder_signals_are_the_cls_row_with_rope_and_the_keys_before_it(attn):
    reference, model = tiny_perception_lm(attn="eager"), tiny_perception_lm(attn=attn)
    pixels = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    blocks = reference.model.vision_tower.timm_model.blocks
    probabilities = _eager_probabilities(reference, blocks, pixels)
    keys = _content_keys(blocks, reference, pixels)
    read = _read(model, [0, 1], pixels)
    for layer in (0, 1):
        torch.testing.assert_close(read["scores"][layer], probabilities[layer][:, :, 0].mean(1), **CLOSE)
        torch.testing.assert_close(read["keys"][layer], keys[layer], **CLOSE)
    # The rotary embedding matters: block 0's CLS row without it is another row.
    calls = []
    block = model.model.vision_tower.timm_model.blocks[0]
    hook = block.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args[0], kwargs)), with_kwargs=True)
    _run_tower(model, pixels, [hook])
    hidden, kwargs = calls[0]
    assert kwargs.get("rope") is not None
    spec = towers.tower_spec(model.model.vision_tower)
    with torch.no_grad():
        q, k, _, scale = spec.qk(block, hidden, {})
        without_rope = torch.softmax(q[:, :, :1] @ k.transpose(-1, -2) * scale, -1)[:, :, 0].mean(1)
    assert not torch.allclose(without_rope, read["scores"][0], atol=1e-3)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k).indices.sort().values


@torch.no_grad()
def test_cls_on_fast_vlm_keeps_the_tokens_that_receive_the_most_attention_in_the_last_block():
    model = tiny_fast_vlm(attn="eager")
    pixels = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(2))
    received = _eager_probabilities(model, model.model.vision_tower.timm_model.stages[-1].blocks, pixels)[-1]
    ids = _prompt((IMAGE_TOKEN_ID, 36))
    with warnings.catch_warnings():  # the substitute for the CLS row is announced once per process
        warnings.simplefilter("ignore")
        handle = vtprune.apply(model, "cls", keep=7)
    with handle:
        model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(handle.last.kept[0], _top(received[0].mean(dim=(0, 1)), 7))


@torch.no_grad()
def test_cls_on_perception_lm_keeps_the_tokens_with_the_most_pooled_cls_attention():
    model = tiny_perception_lm(attn="eager", tile=112)
    pixels = torch.randn(1, 1, 3, 112, 112, generator=torch.Generator().manual_seed(3))  # one crop ("vanilla")
    blocks = model.model.vision_tower.timm_model.blocks
    row = _eager_probabilities(model, blocks, pixels[0])[-1][0, :, 0, 1:].mean(0)  # the last block's, patches only
    pooled = F.avg_pool2d(row.reshape(1, 8, 8), 2).flatten()  # 2 x 2 patches per token, as the projector pools
    ids = _prompt((IMAGE_TOKEN_ID, 16))
    with vtprune.apply(model, "cls", keep=5) as handle:
        model(input_ids=ids, pixel_values=pixels)
    assert torch.equal(handle.last.kept[0], _top(pooled, 5))


@torch.no_grad()
def test_perception_lm_images_are_a_thumbnail_part_and_a_tiles_part_with_the_budget_shared():
    model = tiny_perception_lm(tile=112)
    pixels = torch.randn(1, 4, 3, 112, 112)  # thumbnail + 3 tiles: 4 x 16 tokens
    ids = _prompt((IMAGE_TOKEN_ID, 64))
    with vtprune.apply(model, "cls", keep=16) as handle:
        model(input_ids=ids, pixel_values=pixels)
    kept = handle.last.kept[0]
    assert (kept < 16).sum() == 4 and (kept >= 16).sum() == 12  # in proportion: 16 and 48 tokens
    with pytest.raises(ValueError, match="do not say how its tiles are arranged; use crop_budget='proportional'"):
        vtprune.apply(model, "divprune", keep=16, crop_budget="global")
    assert vtprune.handle_of(model) is None


TOWER_STAGE = [n for n in vtprune.available() if "tower" in vtprune.registry.pruner_class(n).stage]


@pytest.mark.parametrize(
    "build, reason", [(tiny_fast_vlm, "convolutions follow"), (tiny_perception_lm, "average-pools blocks")]
)
def test_tower_stage_pruners_are_refused_with_the_reason(build, reason):
    model = build()
    assert {"tome", "pitome", "mustdrop_merge", "zerotprune", "mustdrop", "aim"} <= set(TOWER_STAGE)
    for name in TOWER_STAGE:
        with pytest.raises(
            ValueError, match=f"inside the vision tower, which it cannot do in TimmWrapperModel.*{reason}"
        ):
            vtprune.apply(model, name, keep=4)
        assert vtprune.handle_of(model) is None


@torch.no_grad()
def test_vflowopt_entropy_reads_perception_lm_pixels_and_is_refused_on_fast_vlm():
    with pytest.raises(ValueError, match=r"normalisation is not known from the model\); use entropy=0"):
        vtprune.apply(tiny_fast_vlm(), "vflowopt", entropy=0.5)
    model = tiny_perception_lm()
    ids, pixels = (
        _prompt((IMAGE_TOKEN_ID, 12)),
        torch.randn(1, 3, 3, 56, 56, generator=torch.Generator().manual_seed(5)),
    )
    kept = []
    for entropy in (0.0, 1e4):  # a weight that outweighs the attention term changes the choice
        with vtprune.apply(model, "vflowopt", keep=4, entropy=entropy) as handle:
            model(input_ids=ids, pixel_values=pixels)
        kept.append(handle.last.kept[0])
    assert not torch.equal(kept[0], kept[1])


@pytest.mark.parametrize("build", [tiny_fast_vlm, tiny_perception_lm])
def test_a_subclass_of_a_timm_tower_vlm_is_claimed_as_its_family(build):
    model = build()

    class Mine(type(model)):
        pass

    model.__class__ = Mine
    pixels = torch.randn(1, 3, 256, 256) if build is tiny_fast_vlm else torch.randn(1, 1, 3, 56, 56)
    n = 16 if build is tiny_fast_vlm else 4
    with vtprune.apply(model, "divprune", keep=3) as handle, torch.no_grad():
        model(input_ids=_prompt((IMAGE_TOKEN_ID, n)), pixel_values=pixels)
    assert handle.last.token_counts == [3]


def test_the_builders_refuse_layouts_their_towers_cannot_make():
    with pytest.raises(ValueError, match="multiples of 32"):
        tiny_fast_vlm(embed_dims=(8, 16, 32, 40, 64))
    with pytest.raises(ValueError, match=r"blocks: five stages of at least one block each, got \(1, 1, 1, 0, 2\)"):
        tiny_fast_vlm(blocks=(1, 1, 1, 0, 2))
    with pytest.raises(ValueError, match=r"tile must be a multiple of 14 \* pooling = 28, got 42"):
        tiny_perception_lm(tile=42)


@pytest.mark.parametrize(
    "build, shape, n", [(tiny_fast_vlm, (3, 384, 384), 36), (tiny_perception_lm, (3, 3, 56, 56), 12)]
)
def test_generate_repeating_the_image_features_samples_like_a_batch_of_copies(build, shape, n):
    """Both families' encoders give one tensor, which num_return_sequences restacks into new tensors:
    each repeated image is matched to the one encoded, its layout and tower scores with it."""
    model = build()
    ids, pixels = _prompt((IMAGE_TOKEN_ID, n)), torch.randn(1, *shape, generator=torch.Generator().manual_seed(4))
    outputs, kept = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # FastViT's substitute for the CLS row, announced once
        handle = vtprune.apply(model, "cls", keep=5)
    with handle, torch.no_grad():
        for batch, extra in (
            ((ids, pixels), {"num_return_sequences": 2}),
            ((ids.repeat(2, 1), pixels.repeat(2, *[1] * len(shape))), {}),
        ):
            torch.manual_seed(0)
            outputs.append(
                model.generate(input_ids=batch[0], pixel_values=batch[1], max_new_tokens=4, do_sample=True, **extra)
            )
            kept.append(handle.last.kept)
    assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(a, b) for a, b in zip(kept[0], kept[1])) and len(kept[0]) == 2


def test_perception_lm_video_features_encoded_without_vtprune_are_refused_with_a_message():
    model = tiny_perception_lm()
    video = torch.randn(1, 4, 3, 56, 56)
    with torch.no_grad():
        encoded = model.model.get_image_features(pixel_values=video, return_dict=True)  # before apply: no layout
    ids = _prompt((VIDEO_TOKEN_ID, 16))
    with vtprune.apply(model, "divprune", keep=4), torch.no_grad():
        with pytest.raises(NotImplementedError, match="do not say which frames make one video"):
            model(input_ids=ids, mm_encoder_outputs={"video": encoded})
