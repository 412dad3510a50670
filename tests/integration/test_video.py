"""Videos, on every family that takes them x every pruner x both budgets: the core equivalences.

``budget="per_frame"``: every frame is pruned like an image, with its own ``keep``;
``budget="per_video"``: ``keep`` counts the whole video's tokens.
"""

import pytest
import torch
from families import VIDEO_FAMILIES, assert_sdpa_equals_eager
from helpers import (
    PIPELINE,
    PRUNER_OPTIONS,
    TOWER,
    VISION,
    apply,
    greedy,
    logits,
    pruned_image_tokens,
    scheduled_count,
    skip_if_refused,
)

import vtprune
from vtprune.pruners.base import VisionTokens
from vtprune.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

# The whole video matrix: the fast lane keeps LLaVA-1.5's image equivalences (test_equivalence.py).
pytestmark = pytest.mark.slow

ALL = sorted(PRUNER_OPTIONS) + [PIPELINE]
BUDGETS = ("per_frame", "per_video")
ONE_VIDEO = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 0, 1)]


@pytest.fixture(params=VIDEO_FAMILIES, ids=lambda f: f.name)
def family(request):
    name = request.node.callspec.params.get("name")
    if name is not None:
        skip_if_refused(request.param.name, name, request.node.callspec.params.get("budget"))
    return request.param


def video_layout(model, family, inputs) -> tuple[int, int, int]:
    """(frames, tokens per frame, fixed tokens after the last frame) of the first video, found from
    the model's own features: fixed tokens equal its newline embedding (OneVision)."""
    features = family.video_features(model, inputs)[0]
    newline = getattr(model.model, "image_newline", None)
    tail = 0 if newline is None else int((features == newline).all(-1).sum())
    frames = family.video_shape[0]
    return frames, (features.shape[0] - tail) // frames, tail


def expected_count(model, family, inputs, name, keep, budget) -> int:
    frames, per_frame, _ = video_layout(model, family, inputs)
    if budget == "per_frame":
        return frames * scheduled_count(model, name, keep, per_frame)
    return scheduled_count(model, name, keep, frames * per_frame)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", ALL)
def test_keep_all_is_the_unpruned_model(family, name, budget):
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    base_logits, base_tokens = logits(model, inputs), greedy(model, inputs)
    frames, per_frame, _ = video_layout(model, family, inputs)
    with apply(model, name, keep=1.0, budget=budget) as handle:
        pruned_logits, pruned_tokens = logits(model, inputs), greedy(model, inputs)
        assert torch.equal(handle.last.kept[0], torch.arange(frames * per_frame))
    torch.testing.assert_close(pruned_logits, base_logits, atol=1e-5, rtol=0)
    assert torch.equal(pruned_tokens, base_tokens)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", ALL)
def test_kept_counts_match_keep(family, name, budget):
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    keep = 3 if budget == "per_frame" else 10
    expected = expected_count(model, family, inputs, name, keep, budget)
    with apply(model, name, keep=keep, budget=budget) as handle:
        logits(model, inputs)
        (count,), (layers,) = handle.last.token_counts, handle.last.layer_tokens
    assert count == layers[-1]
    assert count <= expected if name == "adaptive" else count == expected
    if budget == "per_frame" and name != "adaptive":  # every frame keeps its own share
        frames, per_frame, _ = video_layout(model, family, inputs)
        anchors = torch.tensor([int(g[0]) for g in (handle.last.merged or [[]])[0]], dtype=torch.long)
        per = torch.bincount(torch.cat([handle.last.kept[0], anchors]) // per_frame, minlength=frames)
        assert per.tolist() == [count // frames] * frames


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", ALL)
def test_batched_text_only_video_and_image_with_video_equal_per_sample(family, name, budget):
    model = family.model()
    samples = [([1, 5, 6, 7, 8, 9, 10], [], 0, 0), ([1, 5], [7, 8], 0, 1), ([1, 4, 4, 6], [9, 10, 11], 1, 1)]
    batch, singles = family.batch(model, samples)
    with apply(model, name, keep=0.25, budget=budget) as handle:
        together = greedy(model, batch)
        kept_together = handle.last.kept
        for i, single in enumerate(singles):
            alone = greedy(model, single)
            assert torch.equal(together[i, -8:], alone[0, -8:]), f"sample {i} differs"
            if i:
                assert torch.equal(kept_together[i], handle.last.kept[0])


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("name", VISION)
def test_vision_stage_equals_the_prompt_written_with_the_kept_tokens(family, name, budget):
    """An image and a video in one prompt: the model fed only the kept tokens (and the fixed ones)
    of both, at their original positions for M-RoPE families."""
    model = family.model()
    inputs, _ = family.batch(model, [([1, 5, 6], [8, 9, 10, 11], 1, 1)])
    with apply(model, name, keep=0.25, budget=budget) as handle:
        pruned = logits(model, inputs)
        kept, groups = handle.last.kept[0], (handle.last.merged or [[]])[0]
    ids = inputs["input_ids"][0]
    image, video = family.image_features(model, inputs)[0], family.video_features(model, inputs)[0]
    newline = getattr(model.model, "image_newline", None)
    keeps_positions = "mm_token_type_ids" in inputs
    # What is pruned as one image: the image, and the video whole or (per_frame) each frame.
    frames, per_frame, _ = video_layout(model, family, inputs)
    cuts = [per_frame * (i + 1) for i in range(frames - 1)] if budget == "per_frame" else []
    video_items = list(torch.tensor_split(video, cuts))
    keep_pos = torch.ones(ids.numel(), dtype=torch.bool)
    features, offset = [], 0
    for token_id, items in ((IMAGE_TOKEN_ID, [image]), (VIDEO_TOKEN_ID, video_items)):
        stays_all, tokens_all = [], []
        for f in items:
            fixed = (f == newline).all(-1) if newline is not None else torch.zeros(f.shape[0], dtype=torch.bool)
            n = int((~fixed).sum())
            mine = kept[(kept >= offset) & (kept < offset + n)] - offset
            my_groups = [g - offset for g in groups if offset <= int(g[0]) < offset + n]
            stays, tokens = pruned_image_tokens(f, fixed, mine, my_groups, at_anchor=keeps_positions)
            stays_all.append(stays)
            tokens_all.append(tokens)
            offset += n
        keep_pos[ids == token_id] = torch.cat(stays_all)
        features.append(torch.cat(tokens_all))
    assert int(kept.max()) < offset  # kept indexes the prunable tokens of the image, then the video
    short_ids = ids[keep_pos][None]
    extra = {}
    if "mm_token_type_ids" in inputs:  # M-RoPE: every token keeps its original position
        full, _ = model.model.get_rope_index(
            inputs["input_ids"],
            inputs["mm_token_type_ids"],
            image_grid_thw=inputs["image_grid_thw"],
            video_grid_thw=inputs["video_grid_thw"],
        )
        extra = {"position_ids": full[:, :, keep_pos]}
    with torch.no_grad():
        embeds = model.get_input_embeddings()(short_ids)
        embeds[short_ids == IMAGE_TOKEN_ID] = features[0]
        embeds[short_ids == VIDEO_TOKEN_ID] = features[1]
        expected = model(inputs_embeds=embeds, **extra).logits
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["divprune", "cls", "fastv", PIPELINE])
def test_sdpa_and_eager_agree(family, name):
    assert_sdpa_equals_eager(family, name, ONE_VIDEO, keep=0.25, budget="per_video")


@pytest.mark.parametrize("budget", BUDGETS)
def test_divprune_chooses_among_a_frames_or_the_whole_videos_tokens(family, budget):
    """per_frame: the pruner's own choice on each frame's tokens; per_video: its choice on all of them."""
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    frames, per_frame, _ = video_layout(model, family, inputs)
    features = family.video_features(model, inputs)[0][: frames * per_frame]
    pruner = vtprune.DivPrune(keep=4)
    if budget == "per_frame":
        blocks = features.split(per_frame)
        expected = torch.cat(
            [
                i * per_frame + pruner.select(VisionTokens(features=block, keep=4, grid=None))
                for i, block in enumerate(blocks)
            ]
        )
    else:
        expected = pruner.select(VisionTokens(features=features, keep=4, grid=None))
    with apply(model, "divprune", keep=4, budget=budget) as handle:
        logits(model, inputs)
        assert torch.equal(handle.last.kept[0], expected.cpu())


def test_budget_is_checked():
    with pytest.raises(ValueError, match="budget must be one of"):
        vtprune.DivPrune(keep=8, budget="per_clip")
    with pytest.raises(ValueError, match="count a video's tokens the same way"):
        vtprune.Pipeline([vtprune.DivPrune(keep=16, budget="per_video"), vtprune.FastV(keep=8)])


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("family", [f for f in VIDEO_FAMILIES if f.name.startswith("llava")], ids=lambda f: f.name)
def test_cls_scores_a_pooled_token_by_its_patches_attention_pooled_the_same_way(family, budget):
    """LLaVA-NeXT-Video: the CLS attention of a frame's patches, 2x2 average pooled as the features
    are; OneVision (SigLIP, no CLS): the attention each patch receives, resized as its features are."""
    import torch.nn.functional as F

    model = family.model("eager")
    inputs, _ = family.batch(model, ONE_VIDEO)
    frames = family.video_shape[0]
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values_videos"][0], output_attentions=True).attentions
    if family.name == "llava_next_video":
        maps = attentions[1][:, :, 0, 1:].mean(1).reshape(frames, 1, 8, 8)  # feature layer -2: encoder layer 1
        scores = F.avg_pool2d(maps, 2).flatten(1)
    else:
        maps = attentions[-1].mean(1).mean(1).reshape(frames, 1, 8, 8)
        scores = F.interpolate(maps, size=(4, 4), mode="bilinear").flatten(1)
    if budget == "per_frame":
        expected = torch.cat([16 * i + s.topk(3).indices for i, s in enumerate(scores)]).sort().values
        keep = 3
    else:
        expected, keep = scores.flatten().topk(10).indices.sort().values, 10
    with apply(model, "cls", keep=keep, budget=budget) as handle:
        logits(model, inputs)
    assert handle.last.kept[0].tolist() == expected.tolist()


TENSOR_VIDEOS = [f for f in VIDEO_FAMILIES if f.name.startswith("llava")]  # videos as one (V, N, D) tensor


@pytest.mark.parametrize("family", TENSOR_VIDEOS, ids=lambda f: f.name)
def test_generate_repeating_the_video_features_samples_like_a_batch_of_copies(family):
    """num_return_sequences repeats the encoded videos after encoding (one tensor, restacked): the
    layout then follows from their shape; sampling two sequences equals sampling a batch of two copies."""
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    copies, _ = family.batch(model, ONE_VIDEO * 2)
    copies["pixel_values_videos"] = inputs["pixel_values_videos"].repeat(2, 1, 1, 1, 1)
    outputs = []
    with apply(model, "divprune", keep=3) as handle, torch.no_grad():
        for batch, extra in ((inputs, {"num_return_sequences": 2}), (copies, {})):
            torch.manual_seed(0)
            outputs.append(model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=4, **extra))
            assert handle.last.kept_counts == [12, 12]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("name", ["divprune", "cls"])
@pytest.mark.parametrize("family", [f for f in VIDEO_FAMILIES if f not in TENSOR_VIDEOS], ids=lambda f: f.name)
def test_generate_repeating_a_video_samples_like_a_batch_of_copies(family, name):
    """Videos given as a list per video (Qwen2-VL) or encoded after generate() repeats the pixels
    (PerceptionLM): two returned sequences equal a batch of two copies, tower scores included."""
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    copies, _ = family.batch(model, ONE_VIDEO * 2)
    for key in ("pixel_values_videos", "video_grid_thw"):
        if key in inputs:
            copies[key] = inputs[key].repeat(2, *[1] * (inputs[key].dim() - 1))
    outputs, kept = [], []
    with apply(model, name, keep=3) as handle, torch.no_grad():
        for batch, extra in ((inputs, {"num_return_sequences": 2}), (copies, {})):
            torch.manual_seed(0)
            outputs.append(model.generate(**batch, max_new_tokens=6, do_sample=True, top_k=4, **extra))
            kept.append(handle.last.kept)
    assert torch.equal(outputs[0], outputs[1])
    assert len(kept[0]) == 2 and all(torch.equal(a, b) for a, b in zip(kept[0], kept[1]))


@pytest.mark.parametrize("family", TENSOR_VIDEOS, ids=lambda f: f.name)
def test_cls_with_repeated_video_features_is_refused(family):
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    base = logits(model, inputs)
    with apply(model, "cls", keep=3), torch.no_grad():
        with pytest.raises(NotImplementedError, match="generate one sequence per prompt"):
            model.generate(**inputs, max_new_tokens=2, do_sample=True, num_return_sequences=2)
    assert torch.equal(logits(model, inputs), base)


@pytest.mark.parametrize("name", ["divprune", "fastv"])
def test_budget_has_no_effect_on_images(family, name):
    model = family.model()
    inputs, _ = family.batch(model, [([1, 5, 6], [8, 9, 10], 2)])
    kept = []
    for budget in BUDGETS:
        with apply(model, name, keep=10, budget=budget) as handle:
            logits(model, inputs)
            kept.append(handle.last.kept[0])
    assert torch.equal(kept[0], kept[1]) and kept[0].numel() == 20


@pytest.mark.parametrize("name", ALL)
def test_remove_restores_the_model(family, name):
    model = family.model()
    inputs, _ = family.batch(model, ONE_VIDEO)
    base = logits(model, inputs)
    encoders = ("get_image_features", "get_video_features")
    forward, encode = model.forward, {n: getattr(model.model, n) for n in encoders if hasattr(model.model, n)}
    handle = apply(model, name, keep=3, budget="per_frame" if name in TOWER else "per_video")
    logits(model, inputs)
    handle.remove()
    assert model.forward == forward and {n: getattr(model.model, n) for n in encode} == encode
    assert vtprune.handle_of(model) is None
    assert torch.equal(logits(model, inputs), base)
