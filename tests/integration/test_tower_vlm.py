"""The tower stage inside VLMs' vision towers: ToMe in LLaVA-1.5's CLIP tower equals a hand-run tower
with ToMe's own merge code and a prompt written with one token per merged token; LLaVA-NeXT's and
OneVision's packing rule; DINOv2 (the proxy's tower); Pipelines with a vision and an LLM stage after
it; what is refused, and why. The family matrix (test_families.py) adds keep-all, sdpa == eager,
batched == per-sample and remove() for every family."""

import pytest
import torch
from families import FAMILIES, VIDEO_FAMILIES
from helpers import logits, prompt_with_image_tokens_at
from references import tome_matching

import vtprune
from vtprune.pruners.base import VisionTokens
from vtprune.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID

FAMILY = {f.name: f for f in (*FAMILIES, *VIDEO_FAMILIES)}
ONE_IMAGE = [([1, 5, 6, 7], [8, 9, 10, 11, 12], 1)]


def merged_clip_features(model, pixel_values, plan):
    """LLaVA-1.5's image features with ToMe in its CLIP tower, by hand: the encoder layers up to the
    selected one, each with proportional attention and ToMe's merge after the attention residual, then
    every patch given its token's hidden state, the CLS row dropped and the projector applied.
    Returns the (images, patches, D) features and, per patch, the token it was merged into."""
    tower = model.model.vision_tower
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    batch, n, _ = x.shape
    size = torch.ones(batch, n, 1)
    source = torch.eye(n).expand(batch, n, n)  # source[b, t, p]: token t holds patch p
    for layer, r in zip(tower.encoder.layers, plan):
        attn, h = layer.self_attn, layer.layer_norm1(x)
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        q, k, v = (p(h).view(batch, n, -1, attn.head_dim).transpose(1, 2) for p in projections)
        scores = (q @ k.transpose(-2, -1)) * attn.scale + size.log()[:, None, None, :, 0]
        x = x + attn.out_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, n, -1))
        if r:
            merge = tome_matching(k.mean(1), r, class_token=True)
            x, size, source = merge(x * size, "sum"), merge(size, "sum"), merge(source, "amax")
            x = x / size
        x = x + layer.mlp(layer.layer_norm2(x))
        n = x.shape[1]
    token = source.argmax(1)  # (B, patches + 1): the token each original position is in
    full = x.gather(1, token[..., None].expand(-1, -1, x.shape[-1]))
    return model.model.multi_modal_projector(full[:, 1:]), token[:, 1:]


def first_of_each_token(token: torch.Tensor) -> torch.Tensor:
    """Ascending positions of the first patch of every token (``token``: (P,) the token of each patch)."""
    seen, firsts = set(), []
    for p, t in enumerate(token.tolist()):
        if t not in seen:
            seen.add(t)
            firsts.append(p)
    return torch.tensor(firsts)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("keep", [200, 0.25])
@torch.no_grad()
def test_llava_equals_a_hand_run_tower_and_a_prompt_with_one_token_per_merged_token(attn, keep):
    family = FAMILY["llava"]
    model = family.model(attn)
    inputs, _ = family.batch(model, ONE_IMAGE)
    pruner = vtprune.ToMe(keep=keep)
    plan = pruner.merge_plan(576, 1, 2)  # the tiny tower selects layer 1 of 3: layers 0 and 1 merge
    with vtprune.apply(model, pruner) as handle:
        pruned = logits(model, inputs)
    features, token = merged_clip_features(model, inputs["pixel_values"], plan)
    firsts = first_of_each_token(token[0])
    assert handle.last.token_counts == [pruner.keep_count(576)] == [firsts.numel()]
    groups = [(token[0] == token[0][f]).nonzero().flatten() for f in firsts]
    assert handle.last.kept[0].tolist() == [int(g[0]) for g in groups if g.numel() == 1]
    assert [g.tolist() for g in handle.last.merged[0]] == [g.tolist() for g in groups if g.numel() > 1]
    expected = prompt_with_image_tokens_at(model, inputs, firsts, features[0, firsts])
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_several_matchings_per_block_merge_the_merged_tokens_again():
    family = FAMILY["llava"]
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    with vtprune.apply(model, "tome", keep=24) as handle:
        logits(model, inputs)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    stats = handle.last
    assert stats.token_counts == [24] and stats.layer_tokens[0] == [24] * 4
    groups = [*stats.merged[0], *[k[None] for k in stats.kept[0]]]
    assert sorted(torch.cat(groups).tolist()) == list(range(576))
    for g in groups:  # the tower's output copied onto every patch of a merged token
        assert torch.equal(features[g], features[g[:1]].expand(g.numel(), -1))
    assert torch.unique(features, dim=0).shape[0] == 24


@pytest.mark.parametrize("name", ["llava_next", "llava_next_video", "llava_onevision"])
@torch.no_grad()
def test_anyres_packing_rule(name):
    """Crops are merged one by one in the tower; the model packs their copies (unpadding, newlines,
    OneVision's resampling) as without pruning; each merged token then enters once, at its first
    place; tokens the packing blended from several merged tokens (resampled grids) stay as they are."""
    family = FAMILY[name]
    model = family.model()
    inputs, _ = family.batch(model, [([1, 5], [8, 9], 1)])
    newline = model.model.image_newline
    with vtprune.apply(model, "tome", keep=0.25) as handle:
        logits(model, inputs)
        features = model.model.get_image_features(
            pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"]
        ).pooler_output[0]
    is_newline = (features == newline).all(-1)
    patches = (~is_newline).nonzero().flatten()  # prunable tokens: the stats index these
    stats = handle.last
    groups = [*stats.merged[0], *[k[None] for k in stats.kept[0]]]
    assert sorted(torch.cat(groups).tolist()) == list(range(patches.numel()))  # every patch accounted once
    assert stats.merged[0], "the tower merged nothing"
    for g in stats.merged[0]:  # copies of one tower token
        rows = features[patches[g]]
        assert torch.equal(rows, rows[:1].expand_as(rows))
    entered = stats.token_counts[0] + int(is_newline.sum())
    assert int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum()) > entered  # the prompt got shorter


def tiny_dinov2_llava():
    from transformers import Dinov2Config, Dinov2Model, LlamaConfig, LlamaForCausalLM

    from vtprune.proxy.assemble import build_llava

    torch.manual_seed(0)
    sizes = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64)
    tower = Dinov2Model(Dinov2Config(**sizes, image_size=56, patch_size=14))
    text = LlamaConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=90,
        pad_token_id=0,
    )
    return build_llava(tower.eval(), LlamaForCausalLM(text).eval(), image_token_id=91, vocab_size=96)


@torch.no_grad()
def test_dinov2_tower_merges_with_its_layer_scale_and_keep_all_is_exact():
    model = tiny_dinov2_llava()
    ids = torch.tensor([[1, 5] + [91] * 16 + [8, 9]])
    inputs = {"input_ids": ids, "pixel_values": torch.randn(1, 3, 56, 56, generator=torch.Generator().manual_seed(0))}
    expected = logits(model, inputs)
    with vtprune.apply(model, "tome", keep=1.0):
        assert torch.equal(logits(model, inputs), expected)
    with vtprune.apply(model, "tome", keep=6) as handle:
        pruned = logits(model, inputs)
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    assert pruned.shape[1] == ids.shape[1] - 16 + 6 and handle.last.token_counts == [6]
    firsts = torch.tensor(sorted([*handle.last.kept[0].tolist(), *[int(g[0]) for g in handle.last.merged[0]]]))
    short = torch.cat([ids[:, :2], torch.full((1, 6), 91), ids[:, -2:]], 1)
    embeds = model.get_input_embeddings()(short)
    embeds[short == 91] = features[firsts]
    torch.testing.assert_close(pruned, model(inputs_embeds=embeds).logits, atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_pipeline_chooses_among_the_tokens_leaving_the_tower_then_drops_in_the_llm():
    family = FAMILY["llava"]
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    with vtprune.apply(model, "tome", keep=0.5) as handle:
        logits(model, inputs)
        tower = handle.last
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
    behind = {int(k): k[None] for k in tower.kept[0]} | {int(g[0]): g for g in tower.merged[0]}
    firsts = torch.tensor(sorted(behind))
    chosen = vtprune.DivPrune(keep=48).select(VisionTokens(features[firsts], keep=48))
    pipeline = [vtprune.ToMe(keep=0.5), vtprune.DivPrune(keep=48), vtprune.FastV(layer=2, keep=24)]
    with vtprune.apply(model, pipeline) as handle:
        logits(model, inputs)
    stats = handle.last
    assert stats.layer_tokens[0] == [48, 48, 24, 24] and stats.token_counts == [24]
    assert stats.drops[0][1][0].tolist() == firsts[chosen].tolist()  # the vision stage's choice, by first patch
    survivors = [*stats.kept[0].tolist(), *[int(g[0]) for g in stats.merged[0]]]
    assert set(survivors) <= set(firsts[chosen].tolist()) and len(survivors) == 24
    assert all(torch.equal(g, behind[int(g[0])]) for g in stats.merged[0])  # merged tokens name their patches


@pytest.mark.parametrize("keep", [48, 0.25, 0.75])
@torch.no_grad()
def test_a_pipeline_of_two_sends_the_language_model_as_many_tokens_as_its_second_pruner_alone(keep):
    family = FAMILY["llava"]
    model = family.model()
    inputs, _ = family.batch(model, ONE_IMAGE)
    counts = []
    for pruner in (vtprune.Pipeline.of_two("tome+divprune", keep), vtprune.DivPrune(keep=keep)):
        with vtprune.apply(model, pruner) as handle:
            logits(model, inputs)
            counts.append(handle.last.token_counts)
    n = int((inputs["input_ids"] == IMAGE_TOKEN_ID).sum())
    assert counts == [[keep if isinstance(keep, int) else round(keep * n)]] * 2


def test_tower_pruners_are_refused_where_they_cannot_merge():
    qwen = FAMILY["qwen2_vl"].model()
    with pytest.raises(ValueError, match="its patch merger concatenates every 2x2 block"):
        vtprune.apply(qwen, "tome", keep=16)
    assert vtprune.handle_of(qwen) is None
    onevision = FAMILY["llava_onevision"].model()
    with pytest.raises(ValueError, match="drops patches inside the vision tower, which .* cannot take: its packing"):
        vtprune.apply(onevision, "zerotprune", keep=16)
    assert vtprune.handle_of(onevision) is None
    llava = FAMILY["llava"].model()
    for pipeline, message in [
        ([vtprune.DivPrune(keep=32), vtprune.ToMe(keep=64)], "tower-stage pruner .* must come first"),
        ([vtprune.ToMe(keep=64), vtprune.ToMe(keep=32)], "at most one tower-stage pruner"),
        ([vtprune.ToMe(keep=64, layers=[2])], r"layers=\[2\]: the tower has blocks 0 to 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            vtprune.apply(llava, pipeline)
        assert vtprune.handle_of(llava) is None


def pooled_video(frames=3, seed=0, **options):
    """LLaVA-NeXT-Video's tiny model and a prompt with one video: each frame's 8 x 8 patches are pooled
    to 4 x 4 tokens after the tower."""
    from vtprune.testing import tiny_llava_next_video, video_token_counts

    model = tiny_llava_next_video(**options)
    videos = torch.randn(1, frames, 3, 112, 112, generator=torch.Generator().manual_seed(seed))
    n = video_token_counts(model, pixel_values_videos=videos)[0]
    assert n == 16 * frames
    return model, {"input_ids": torch.tensor([[1, 5] + [VIDEO_TOKEN_ID] * n + [8]]), "pixel_values_videos": videos}


def prompt_with_video_tokens(model, inputs, features):
    """Logits of the prompt with as many video tokens as ``features`` rows, fed them in order."""
    ids = inputs["input_ids"][0]
    is_video = ids == VIDEO_TOKEN_ID
    first = int(is_video.nonzero()[0])
    short = torch.cat([ids[:first], torch.full((features.shape[0],), VIDEO_TOKEN_ID), ids[first:][~is_video[first:]]])
    embeds = model.get_input_embeddings()(short[None])
    embeds[0, short == VIDEO_TOKEN_ID] = features
    return model(inputs_embeds=embeds).logits


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_pooled_frames_take_the_tokens_leaving_the_tower_in_their_slots(attn):
    """The tokens leaving the tower take the pooling's place: per frame, ``keep`` of its 16 pooled
    tokens, the hand-run tower's tokens in the order of their first patch, in the frame's first slots."""
    model, inputs = pooled_video(attn=attn, vision_layers=4)
    pruner = vtprune.ToMe(keep=10)
    plan = pruner.merge_plan(64, 1, 3, counted_on=16)  # layers 0 to 2 merge, one matching each: 64 -> 10
    with vtprune.apply(model, pruner) as handle:
        pruned = logits(model, inputs)
    features, token = merged_clip_features(model, inputs["pixel_values_videos"][0], plan)
    firsts = [first_of_each_token(t) for t in token]
    assert [f.numel() for f in firsts] == [10, 10, 10]
    assert handle.last.token_counts == [30] and handle.last.merged in ([], [[]])
    assert handle.last.kept[0].tolist() == [s + 16 * f for f in range(3) for s in range(10)]
    expected = prompt_with_video_tokens(model, inputs, torch.cat([features[f, i] for f, i in enumerate(firsts)]))
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


@torch.no_grad()
def test_pooled_frames_keep_all_leaves_the_pooling_and_a_pipeline_chooses_among_the_slots():
    model, inputs = pooled_video(frames=2)
    expected = logits(model, inputs)
    with vtprune.apply(model, "tome", keep=1.0) as handle:
        assert torch.equal(logits(model, inputs), expected) and handle.last.token_counts == [32]
    with vtprune.apply(model, "tome", keep=8):
        tokens = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output[0]
    assert torch.equal(tokens[8:16], torch.zeros_like(tokens[8:16])) and bool(tokens[:8].abs().sum(-1).gt(0).all())
    chosen = [vtprune.DivPrune(keep=3).select(VisionTokens(tokens[16 * f : 16 * f + 8], keep=3)) for f in range(2)]
    with vtprune.apply(model, [vtprune.ToMe(keep=8), vtprune.DivPrune(keep=3)]) as handle:
        pruned = logits(model, inputs)
    assert handle.last.kept[0].tolist() == [int(i) + 16 * f for f, c in enumerate(chosen) for i in c]
    rows = torch.cat([tokens[16 * f : 16 * f + 8][c] for f, c in enumerate(chosen)])
    torch.testing.assert_close(pruned, prompt_with_video_tokens(model, inputs, rows), atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_vision_stage_pruner_after_the_tower_may_count_the_whole_video():
    model, inputs = pooled_video(frames=2)
    with vtprune.apply(model, "tome", keep=8):
        tokens = model.model.get_video_features(pixel_values_videos=inputs["pixel_values_videos"]).pooler_output[0]
    slots = torch.cat([torch.arange(8), 16 + torch.arange(8)])
    chosen = vtprune.DivPrune(keep=6).select(VisionTokens(tokens[slots], keep=6))
    with vtprune.apply(model, [vtprune.ToMe(keep=8), vtprune.DivPrune(keep=6, budget="per_video")]) as handle:
        logits(model, inputs)
    assert handle.last.kept[0].tolist() == slots[chosen.sort().values].tolist()


@torch.no_grad()
def test_pooled_frames_refuse_more_tokens_than_slots_and_a_per_video_budget():
    model, inputs = pooled_video(frames=2)
    expected = logits(model, inputs)
    with vtprune.apply(model, "tome", r=2):  # 64 -> 60 tokens per frame: more than its 16 slots
        with pytest.raises(ValueError, match="left the vision tower as 60 tokens, more than the 16"):
            logits(model, inputs)
    assert torch.equal(logits(model, inputs), expected)
    with pytest.raises(ValueError, match="only budget='per_frame'"):
        vtprune.ToMe(keep=8, budget="per_video")


@torch.no_grad()
def test_a_tower_that_resizes_its_positions_is_checked_on_the_grid_it_is_fed():
    # The proxy's DINOv2 has a 37x37 position table and is fed 16x16 patches: config.image_size does
    # not tell the grid, so a keep is checked at the forward, on the grid the tower really sees.
    model = tiny_dinov2_llava()  # a 4x4 table, fed 84 px here: 6x6 patches, four 3x3 windows
    ids = torch.tensor([[1, 5] + [91] * 36 + [8, 9]])
    pixels = torch.randn(1, 3, 84, 84, generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids, "pixel_values": pixels}
    expected = logits(model, inputs)
    with vtprune.apply(model, "mustdrop_merge", keep=5) as handle:  # 4x4 could not reach 5; 6x6 can
        logits(model, inputs)
    assert handle.last.token_counts == [5]
    with vtprune.apply(model, "mustdrop_merge", keep=3):
        with pytest.raises(ValueError, match="on a 6x6 grid leave at least 4 of 36 patches"):
            logits(model, inputs)
    assert torch.equal(logits(model, inputs), expected)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@torch.no_grad()
def test_zerotprune_in_clip_equals_a_hand_run_tower_and_a_prompt_without_the_dropped_patches(attn):
    """The ops (checked against the method restated token by token in test_zerotprune.py) applied by
    hand to CLIP's attention: dropped patches leave no token; the rest enter at their own places."""
    from vtprune.ops import attention_rank, importance_guided_drops

    family = FAMILY["llava"]
    model = family.model(attn)
    inputs, _ = family.batch(model, ONE_IMAGE)
    pruner = vtprune.ZeroTPrune(keep=200)
    tower = model.model.vision_tower
    plan = pruner.merge_plan(576, 1, 2)  # the tiny tower selects layer 1 of 3: layers 0 and 1 drop
    with vtprune.apply(model, pruner) as handle:
        pruned = logits(model, inputs)
    x = tower.pre_layrnorm(tower.embeddings(inputs["pixel_values"]))
    places = torch.arange(-1, 576)  # the patch each row stands for (-1: CLS)
    for index, (layer, r) in enumerate(zip(tower.encoder.layers, plan)):
        a, h = layer.self_attn, layer.layer_norm1(x)
        q, k, v = (p(h).view(1, x.shape[1], -1, a.head_dim).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        probs = ((q @ k.transpose(-2, -1)) * a.scale).softmax(-1)
        x = x + a.out_proj((probs @ v).transpose(1, 2).reshape(1, x.shape[1], -1))
        importance = attention_rank(probs, pruner.iterations_at(index, 3), 1, pruner.variance_band)
        kept = importance_guided_drops(k.mean(1), importance, r, 1).kept[0]
        x, places = x[:, kept], places[kept]
        x = x + layer.mlp(layer.layer_norm2(x))
    order = places[1:].argsort()
    features = model.model.multi_modal_projector(x[0, 1:][order])
    stays_at = places[1:][order]
    assert handle.last.token_counts == [200] and torch.equal(handle.last.kept[0], stays_at)
    expected = prompt_with_image_tokens_at(model, inputs, stays_at, features)
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)
