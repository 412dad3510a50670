"""Qwen2-VL and Qwen2.5-VL specifics: kept tokens keep their original M-RoPE positions, rope_deltas stays consistent."""

import pytest
import torch
import torch.nn.functional as F
from families import FAMILIES, assert_processor_batches_prune_like_single_prompts
from helpers import apply, greedy

import vtprune
import vtprune.pruners.cls as cls_module
from vtprune.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID


@pytest.fixture(params=[f for f in FAMILIES if f.name.startswith("qwen")], ids=lambda f: f.name)
def qwen(request):
    return request.param


ONE_IMAGE = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)]
IMAGE_AND_VIDEO = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1, 1)]
PRUNERS = ["divprune", "uniform", "fastv", "pdrop", "divprune+fastv"]


def original_positions(model, ids, token_types, grid, video_grid=None):
    positions, _ = model.model.get_rope_index(ids, token_types, image_grid_thw=grid, video_grid_thw=video_grid)
    return positions  # (3, 1, L)


@pytest.mark.parametrize("prompt", ["image", "image+video"])
@pytest.mark.parametrize("name", PRUNERS)
def test_every_layer_sees_the_original_positions_of_the_tokens_it_holds(qwen, name, prompt):
    model = qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE if prompt == "image" else IMAGE_AND_VIDEO)
    ids = inputs["input_ids"]
    lm = model.model.language_model
    seen = {}

    def record(i):
        def hook(module, args, kwargs):
            seen[i] = kwargs["position_embeddings"][0][0].clone()

        return hook

    with apply(model, name, keep=12) as handle:
        hooks = [layer.register_forward_pre_hook(record(i), with_kwargs=True) for i, layer in enumerate(lm.layers)]
        try:
            with torch.no_grad():
                model(**inputs)
        finally:
            for h in hooks:
                h.remove()
        stats = handle.last
    positions = original_positions(
        model, ids, inputs["mm_token_type_ids"], inputs["image_grid_thw"], inputs.get("video_grid_thw")
    )
    with torch.no_grad():
        full_cos = lm.rotary_emb(torch.zeros(1, ids.shape[1], 64), positions)[0][0]  # (L, head_dim)
    # kept indexes the prompt's visual tokens, image and video, in prompt order
    image = ((ids[0] == IMAGE_TOKEN_ID) | (ids[0] == VIDEO_TOKEN_ID)).nonzero().flatten()
    # What each layer holds: the vision stage's choice from layer 0, each LLM drop's from its layer.
    holds = dict(stats.drops) if stats.drops else {0: stats.kept}
    present = torch.ones(ids.shape[1], dtype=torch.bool)
    for i in range(len(lm.layers)):
        if i in holds:
            present[image] = False
            present[image[holds[i][0]]] = True
        assert torch.equal(seen[i], full_cos[present]), f"layer {i}"  # before any drop: every token


def reference_generate(model, inputs, drops, n=6, logits=None):
    """Greedy decoding without a cache, recomputing every step: each drop point's layer on holds only
    that drop's kept image tokens, every token at its original M-RoPE position (get_rope_index of the
    whole unpruned sequence)."""
    lm = model.model.language_model
    ids, types, grid = inputs["input_ids"], inputs["mm_token_type_ids"], inputs["image_grid_thw"]
    video_grid = inputs.get("video_grid_thw")
    # the prompt's visual tokens: its image, then its video when it has one
    image = ((ids[0] == IMAGE_TOKEN_ID) | (ids[0] == VIDEO_TOKEN_ID)).nonzero().flatten()
    with torch.no_grad():
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_grid_thw=grid, return_dict=True
        ).pooler_output[0]
        if video_grid is not None:
            video = model.model.get_video_features(
                pixel_values_videos=inputs["pixel_values_videos"], video_grid_thw=video_grid, return_dict=True
            ).pooler_output[0]
            features = torch.cat([features, video])
    drops = dict(drops)
    for _ in range(n):
        length = ids.shape[1]
        with torch.no_grad():
            h = model.get_input_embeddings()(ids)
            h[0, image] = features
            cos, sin = lm.rotary_emb(h, original_positions(model, ids, types, grid, video_grid))
            order = torch.arange(length)
            for i, decoder_layer in enumerate(lm.layers):
                if i in drops:
                    keep = torch.ones(length, dtype=torch.bool)
                    dropped = torch.ones(image.numel(), dtype=torch.bool)
                    dropped[drops[i]] = False
                    keep[image[dropped]] = False
                    keep = keep[order]
                    h, cos, sin, order = h[:, keep], cos[:, keep], sin[:, keep], order[keep]
                allowed = order[None, :] <= order[:, None]
                mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
                h = decoder_layer(h, attention_mask=mask, position_embeddings=(cos, sin))
            step_logits = model.lm_head(lm.norm(h[:, -1]))
            next_token = step_logits.argmax(-1)
        if logits is not None:
            logits.append(step_logits)
        ids = torch.cat([ids, next_token[:, None]], dim=1)
        types = torch.cat([types, torch.zeros_like(types[:, :1])], dim=1)
    return ids


@pytest.mark.parametrize("prompt", ["image", "image+video/per_frame", "image+video/per_video"])
@pytest.mark.parametrize("name", ["divprune", "uniform", "fastv", "pdrop", "transprune"])
def test_generate_equals_the_reference_at_original_positions(qwen, name, prompt):
    model = qwen.model("eager")
    inputs, _ = qwen.batch(model, ONE_IMAGE if prompt == "image" else IMAGE_AND_VIDEO)
    budget = prompt.split("/")[1] if "/" in prompt else "per_frame"
    with apply(model, name, keep=12 if budget == "per_video" else 6, budget=budget) as handle:
        out = greedy(model, inputs, n=6)
        stats = handle.last
    drops = stats.drops if stats.drops else [(0, stats.kept)]
    expected = reference_generate(model, inputs, [(layer, kept[0]) for layer, kept in drops])
    assert torch.equal(out, expected)


def test_a_decode_step_after_a_pruned_forward_continues_the_original_positions(qwen):
    model = qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE)
    with apply(model, "divprune", keep=12) as handle, torch.no_grad():
        prefill = model(**inputs, use_cache=True)
        token = prefill.logits[:, -1:].argmax(-1)
        # No position ids, no mask: the model continues from the cache's length plus rope_deltas.
        step = model(
            input_ids=token, past_key_values=prefill.past_key_values, mm_token_type_ids=torch.zeros_like(token)
        )
        kept = handle.last.kept[0]
    expected_logits = []
    expected = reference_generate(model, inputs, [(0, kept)], n=2, logits=expected_logits)
    assert int(token) == int(expected[0, -2])
    torch.testing.assert_close(step.logits[:, -1], expected_logits[1], atol=1e-4, rtol=0)


def test_rope_deltas_are_restored_when_a_pruned_forward_raises(qwen):
    model = qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE)
    with torch.no_grad():
        model(**inputs)
    before = model.model.rope_deltas.clone()

    def boom(module, args, kwargs):
        raise RuntimeError("boom")

    other, _ = qwen.batch(model, [([1] * 9, [2], 1)])  # a different prompt: different deltas
    with apply(model, "divprune", keep=8):
        hook = model.model.language_model.layers[1].register_forward_pre_hook(boom, with_kwargs=True)
        try:
            with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
                model(**other)
        finally:
            hook.remove()
    assert torch.equal(model.model.rope_deltas, before)


def test_images_without_mm_token_type_ids_are_refused_with_a_message(qwen):
    model = qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE)
    del inputs["mm_token_type_ids"]
    with vtprune.apply(model, "divprune", keep=8), pytest.raises(ValueError, match="mm_token_type_ids"):
        model(**inputs)


def test_cls_scores_each_token_by_the_attention_its_patches_receive(qwen):
    """The substitute score, recomputed by hand from the last tower block's input; which merged token
    each block-order group becomes is read off the features (Qwen2.5-VL reorders them into windows)."""
    model = qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE)
    tower = model.model.visual
    captured = {}

    def grab_input(module, args, kwargs):
        captured["hidden"], captured["kwargs"] = (args[0] if args else kwargs["hidden_states"]), kwargs

    def grab_output(module, args, output):
        captured["out"] = output

    handles = [
        tower.blocks[-1].register_forward_pre_hook(grab_input, with_kwargs=True),
        tower.blocks[-1].register_forward_hook(grab_output),
    ]
    try:
        with torch.no_grad():
            features = tower(inputs["pixel_values"], grid_thw=inputs["image_grid_thw"]).pooler_output
    finally:
        for h in handles:
            h.remove()
    block, hidden, kwargs = tower.blocks[-1], captured["hidden"], captured["kwargs"]
    with torch.no_grad():
        x = block.norm1(hidden)
        n, heads = x.shape[0], block.attn.num_heads
        q, k, _ = block.attn.qkv(x).reshape(n, 3, heads, -1).permute(1, 0, 2, 3).unbind(0)
        module = __import__(type(block.attn).__module__, fromlist=["apply_rotary_pos_emb_vision"])
        q, k = module.apply_rotary_pos_emb_vision(q, k, *kwargs["position_embeddings"])
        probs = torch.softmax((q.transpose(0, 1) @ k.transpose(0, 1).transpose(1, 2)) * block.attn.scaling, -1)
        received = probs.mean(0).mean(0)  # one image: one segment
        block_order = tower.merger(captured["out"])  # merged tokens in the blocks' order
    group_scores = received.reshape(-1, 4).mean(1)
    order = [int((block_order == f).all(-1).nonzero()[0]) for f in features]  # feature i <- group order[i]
    scores = group_scores[torch.tensor(order)]
    cls_module._WARNED.discard(("cls", type(tower).__name__))  # warned once per process: make this the first time
    with pytest.warns(UserWarning, match="no CLS token"):
        handle = vtprune.apply(model, "cls", keep=15)
    with handle, torch.no_grad():
        model(**inputs)
    assert torch.equal(handle.last.kept[0], scores.topk(15).indices.sort().values)


def real_processor():
    from vtprune.testing import tiny_qwen2_vl_processor

    return tiny_qwen2_vl_processor()


def model_for(vocab):
    from vtprune.testing import tiny_qwen2_vl_for

    return tiny_qwen2_vl_for(vocab)


def test_the_processors_batches_prune_like_single_prompts():
    from PIL import Image

    processor, vocab = real_processor()
    model = model_for(vocab)
    picture = "<|vision_start|><|image_pad|><|vision_end|>"
    texts = [f"{picture} what is in the image ?", f"a red {picture} what is the circle ?"]
    pictures = [Image.new("RGB", (200, 120), (200, 30, 30)), Image.new("RGB", (90, 150), (20, 30, 200))]
    batch, kept = assert_processor_batches_prune_like_single_prompts(model, processor, texts, pictures)
    assert set(batch) >= {"mm_token_type_ids", "image_grid_thw"}
    n_tokens = [int(g.prod()) // 4 for g in batch["image_grid_thw"]]
    for counts in kept.values():
        assert counts == [max(1, round(0.25 * n)) for n in n_tokens]


def test_the_processors_video_batches_prune_like_single_prompts():
    """Videos of different lengths and sizes through Qwen2-VL's video processor; per frame (a
    temporal patch of two frames), a quarter of each frame's tokens stays."""
    import numpy as np
    from transformers import Qwen2VLVideoProcessor

    processor, vocab = real_processor()
    processor.video_processor = Qwen2VLVideoProcessor(
        size={"shortest_edge": 56 * 56, "longest_edge": 224 * 224}, cap_pixels_per_frame=False
    )
    model = model_for(vocab)
    video = "<|vision_start|><|video_pad|><|vision_end|>"
    texts = [f"{video} what is in the image ?", f"a red {video} what is the circle ?"]
    rng = np.random.default_rng(0)
    clips = [
        rng.integers(0, 255, (4, 112, 168, 3), dtype=np.uint8),
        rng.integers(0, 255, (6, 84, 84, 3), dtype=np.uint8),
    ]
    batch, kept = assert_processor_batches_prune_like_single_prompts(model, processor, texts, clips, kind="videos")
    grids = batch["video_grid_thw"].tolist()
    assert [t for t, _, _ in grids] == [2, 3]
    for counts in kept.values():
        assert counts == [t * max(1, round(0.25 * h * w / 4)) for t, h, w in grids]


def _turn(model, inputs, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True, output_logits=True, **kwargs
        )


@pytest.mark.parametrize("types", [True, False], ids=["with_token_types", "without"])
@pytest.mark.parametrize("prompt", ["image", "image+video"])
@pytest.mark.parametrize("name", ["divprune", "uniform", "visionzip", "todre"])
def test_continuing_a_shortened_cache_equals_starting_over(qwen, name, prompt, types):
    model = qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE if prompt == "image" else IMAGE_AND_VIDEO)
    visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    with apply(model, name, keep=16):
        # no placeholder ids among the generated tokens: starting over must see the prompt's images only
        first = _turn(model, inputs, suppress_tokens=[IMAGE_TOKEN_ID, VIDEO_TOKEN_ID])
        ids = torch.cat([first.sequences, torch.tensor([[40, 41, 42]])], dim=1)
        mask = torch.ones_like(ids)
        token_types = F.pad(inputs["mm_token_type_ids"], (0, ids.shape[1] - inputs["mm_token_type_ids"].shape[1]))
        more = {"mm_token_type_ids": token_types} if types else {}
        continued = _turn(
            model, {"input_ids": ids, "attention_mask": mask, **more}, past_key_values=first.past_key_values
        )
        scratch = _turn(model, {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": token_types, **visual})
    assert torch.equal(continued.sequences, scratch.sequences)
    for a, b in zip(continued.logits, scratch.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.filterwarnings("ignore:the '.*' pruner.*has no CLS token")  # the substitute score
@pytest.mark.parametrize("prompt", ["image", "image+video"])
@pytest.mark.parametrize("name", ["cls", "divprune", "random", "uniform", "visionzip", "todre"])
def test_assisted_greedy_equals_greedy(qwen, name, prompt):
    model, assistant = qwen.model(), qwen.model()
    inputs, _ = qwen.batch(model, ONE_IMAGE if prompt == "image" else IMAGE_AND_VIDEO)
    with apply(model, name, keep=16), torch.no_grad():
        greedy_out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        assisted = model.generate(**inputs, max_new_tokens=6, do_sample=False, assistant_model=assistant)
    assert torch.equal(assisted, greedy_out)
