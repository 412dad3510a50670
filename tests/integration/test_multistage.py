"""Multi-stage pruning: drop schedules and budgets, the scores inside the LLM, the scheduled pruners
(pdrop, transprune, adaptive) against slow references, and Pipeline composition."""

import pytest
import torch
from helpers import greedy, logits
from references import image_features, reference_generate

import vtprune
from vtprune.core.schedule import layer_counts
from vtprune.ops import transition_variation
from vtprune.pruners.base import PromptTokens
from vtprune.testing import IMAGE_TOKEN_ID, batch_inputs, make_prompt, surviving_positions, tiny_llava

SCHEDULED = ["adaptive", "pdrop", "transprune"]


@pytest.fixture(scope="module")
def deep_model():
    """Eight decoder layers: room for three drops and budgets below a quarter of the tokens."""
    return tiny_llava(layers=8, attn="sdpa")


@pytest.fixture(scope="module")
def deep_eager_model():
    return tiny_llava(layers=8, attn="eager")


def _inputs(model, text_after=(8, 9, 10, 11, 12)):
    return batch_inputs(model, [make_prompt(model, [1, 5, 6, 7], list(text_after))])


# -- schedules and budgets ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pdrop", "transprune"])
@pytest.mark.parametrize("keep", [100, 0.3])
def test_layer_tokens_mean_is_keep(deep_model, name, keep):
    inputs = _inputs(deep_model)
    with vtprune.apply(deep_model, name, keep=keep) as handle, torch.no_grad():
        deep_model(**inputs)
    counts = handle.last.layer_tokens[0]
    target = keep if isinstance(keep, int) else keep * 576
    assert len(counts) == 8 and abs(sum(counts) / 8 - target) <= 1.0
    assert counts[0] == 576 and all(b <= a for a, b in zip(counts, counts[1:]))
    assert [layer for layer, _ in handle.last.drops] == [i for i in range(1, 8) if counts[i] < counts[i - 1]]
    assert torch.equal(handle.last.drops[-1][1][0], handle.last.kept[0])


def test_adaptive_never_exceeds_the_schedule(deep_model):
    inputs = _inputs(deep_model)
    with vtprune.apply(deep_model, "adaptive", keep=100, mass=0.5) as handle, torch.no_grad():
        deep_model(**inputs)
    from vtprune.patches import adapter_for

    caps = layer_counts(vtprune.AdaptivePrune(keep=100).drop_points(adapter_for(deep_model).info, 576), 8, 576)
    assert all(c <= cap for c, cap in zip(handle.last.layer_tokens[0], caps))
    assert sum(handle.last.layer_tokens[0]) / 8 <= 100


def test_explicit_schedule_overrides_keep(deep_model):
    inputs = _inputs(deep_model)
    with vtprune.apply(deep_model, "pdrop", schedule=[(2, 288), (5, 40)]) as handle, torch.no_grad():
        deep_model(**inputs)
    assert handle.last.layer_tokens[0] == [576, 576, 288, 288, 288, 40, 40, 40]
    drop_at_2, drop_at_5 = handle.last.drops
    assert drop_at_2[0] == 2 and drop_at_5[0] == 5
    assert bool(torch.isin(drop_at_5[1][0], drop_at_2[1][0]).all())  # later drops choose among the survivors


@pytest.mark.parametrize(
    "name, options, counts",
    [
        ("pdrop", {}, [576, 576, 288, 288, 144, 144, 72, 72]),  # 50/25/12.5% from 1/4, 1/2, 3/4 of 8 layers
        ("pdrop", {"ratio": 0.25}, [576, 576, 144, 144, 36, 36, 9, 9]),  # the paper's lambda as an option
        ("transprune", {}, [576, 576, 504, 360, 72, 72, 72, 72]),  # 87.5/62.5/12.5% from 7, 9, 12 of 32
        ("adaptive", {"mass": 1.0}, [576, 576, 288, 288, 144, 144, 72, 72]),  # PyramidDrop's caps, all used
    ],
)
def test_paper_schedule_runs_the_published_drops_whatever_keep(deep_model, name, options, counts):
    inputs = _inputs(deep_model)
    with vtprune.apply(deep_model, name, keep=16, schedule="paper", **options) as handle, torch.no_grad():
        deep_model(**inputs)
    if name == "adaptive":  # a cap, not a count: the rule keeps at most it
        assert all(c <= cap for c, cap in zip(handle.last.layer_tokens[0], counts))
        assert handle.last.layer_tokens[0][:2] == counts[:2] and handle.last.layer_tokens[0][2] < 576
    else:
        assert handle.last.layer_tokens[0] == counts


# -- generation against a recompute reference ------------------------------------------------------------
@pytest.mark.parametrize("name", SCHEDULED)
def test_scheduled_generation_matches_recompute_reference(deep_model, deep_eager_model, name):
    inputs = _inputs(deep_model)
    for m in (deep_model, deep_eager_model):
        with vtprune.apply(m, name, keep=120) as handle:
            tokens = greedy(m, inputs, n=6)
            drops = [(layer, kept[0]) for layer, kept in handle.last.drops]
        assert len(drops) >= 2
        assert torch.equal(tokens, reference_generate(deep_eager_model, inputs, drops, 6))


def test_pipeline_generation_matches_recompute_reference(deep_model):
    inputs = _inputs(deep_model)
    pipeline = vtprune.Pipeline([vtprune.DivPrune(keep=200), vtprune.PyramidDrop(keep=60)])
    with vtprune.apply(deep_model, pipeline) as handle:
        tokens = greedy(deep_model, inputs, n=6)
        stats = handle.last
    with vtprune.apply(deep_model, "divprune", keep=200) as vision:
        deep_model(**inputs)
        survivors = vision.last.kept[0]
    # Every LLM-stage drop chooses among the vision stage's survivors, reported as original indices.
    for _, kept in stats.drops:
        assert bool(torch.isin(kept[0], survivors).all())
    assert stats.layer_tokens[0][0] == 200 and abs(sum(stats.layer_tokens[0]) / 8 - 60) <= 1.0
    assert torch.equal(stats.drops[0][1][0], survivors)  # the vision stage is the first drop, at layer 0
    # The reference: the prompt written with the survivors only (positions close up, as a shorter
    # prompt's do), then the LLM drops among them.
    ids = inputs["input_ids"][0]
    short = {"input_ids": ids[surviving_positions(ids, survivors)][None]}
    drops = [(layer, torch.searchsorted(survivors, kept[0])) for layer, kept in stats.drops[1:]]
    features = image_features(deep_model, inputs)[survivors]
    assert torch.equal(tokens[0, -6:], reference_generate(deep_model, short, drops, 6, features=features)[0, -6:])


# -- the scores, against hand-made cases and eager attention -----------------------------------------


@pytest.mark.parametrize("name", ["pdrop", "adaptive", "transprune"])
def test_scores_inside_the_llm_match_eager_attention_and_hooks(deep_model, deep_eager_model, name):
    inputs = _inputs(deep_model, text_after=(8, 9, 10, 11, 12, 13, 14))
    seen = []

    pruner = vtprune.registry.pruner_class(name)(keep=100)
    original_select = type(pruner).select

    def recording_select(tokens: PromptTokens):
        seen.append(tokens)
        return original_select(pruner, tokens)

    object.__setattr__(pruner, "select", recording_select)
    for m in (deep_model, deep_eager_model):
        seen.clear()
        with vtprune.apply(m, pruner) as handle, torch.no_grad():
            m(**inputs)
        first_drop = handle.last.drops[0][0]
        first = seen[0]
        assert torch.equal(first.positions, torch.arange(576)) and first.grid == (24, 24)
        reference = _eager_signals(deep_eager_model, inputs, first_drop)
        for signal, field in [
            ("last", "attention"),
            ("instruction", "instruction_attention"),
            ("transition", "transition"),
        ]:
            value = getattr(first, field)
            if signal in pruner.signals:
                torch.testing.assert_close(value, reference[signal], atol=2e-6, rtol=1e-4, msg=f"{name} {signal}")
            else:
                assert value is None


def _eager_signals(eager_model, inputs, layer):
    """The signals at ``layer`` (the first drop; nothing dropped before it), read off an unpruned eager
    forward: returned attention maps and the sub-layers' inputs and outputs from hooks."""
    lm = eager_model.model.language_model
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    instruction = torch.arange(int(image[-1]) + 1, ids.numel())
    pairs = []

    def record(module, args, kwargs, output):
        x = args[0] if args else kwargs["hidden_states"]
        pairs.append((x, output[0] if isinstance(output, tuple) else output))

    window = range(max(0, layer - 1), layer)  # TransPrune: from the layer before the first drop
    hooks = [
        m.register_forward_hook(record, with_kwargs=True)
        for i in window
        for m in (lm.layers[i].self_attn, lm.layers[i].mlp)
    ]
    try:
        with torch.no_grad():
            attentions = eager_model(**inputs, output_attentions=True).attentions
    finally:
        for h in hooks:
            h.remove()
    a = attentions[layer][0].float().mean(0)  # head mean, (L, L)
    ttv = sum(transition_variation(x[0], y[0]) for x, y in pairs)
    return {"last": a[-1, image], "instruction": a[instruction][:, image].mean(0), "transition": ttv[image]}


def test_adaptive_keeps_different_counts_per_sample():
    """Two samples whose instruction attention is spread differently need different numbers of tokens
    to reach the same mass: the counts follow the rule on each sample's own attention."""
    deep_model = tiny_llava(layers=8)
    with torch.no_grad():  # sharper attention than random init gives, so samples differ clearly
        for layer in deep_model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(6)
            layer.self_attn.k_proj.weight.mul_(6)
    prompts = [make_prompt(deep_model, [1, 5], [8, 9, 10]), make_prompt(deep_model, [1], [30, 41, 52, 63, 74, 85, 86])]
    batched = batch_inputs(deep_model, prompts, seed=4)
    pruner = vtprune.AdaptivePrune(keep=0.6, mass=0.3, min_keep=4)
    seen = []
    original_select = type(pruner).select
    object.__setattr__(pruner, "select", lambda tokens: seen.append(tokens) or original_select(pruner, tokens))
    with vtprune.apply(deep_model, pruner) as handle:
        together = greedy(deep_model, batched, n=5)
        counts = handle.last.kept_counts
        first = handle.last.drops[0][1]
        # the first drop's counts are the rule applied to each sample's own attention at that drop
        for tokens, kept in zip(seen[:2], first):
            assert kept.numel() == pruner.count(tokens.instruction_attention, tokens.keep)
        for i, p in enumerate(prompts):
            single = {
                "input_ids": batched["input_ids"][i : i + 1, -len(p) :],
                "pixel_values": batched["pixel_values"][i : i + 1],
            }
            alone = greedy(deep_model, single, n=5)
            assert torch.equal(together[i, -5:], alone[0, -5:])
            assert handle.last.kept_counts == [counts[i]]
    assert abs(first[0].numel() - first[1].numel()) >= 5


# -- composition -----------------------------------------------------------------------------------------
def test_list_is_a_pipeline(model, inputs):
    a = vtprune.Pipeline([vtprune.DivPrune(keep=96), vtprune.FastV(layer=2, keep=32)])
    with vtprune.apply(model, a) as handle:
        expected, kept = logits(model, inputs), handle.last.kept[0]
    with vtprune.apply(model, [vtprune.DivPrune(keep=96), vtprune.FastV(layer=2, keep=32)]) as handle:
        assert torch.equal(logits(model, inputs), expected) and torch.equal(handle.last.kept[0], kept)
        assert handle.last.layer_tokens[0] == [96, 96, 32, 32] and kept.max() < 576


def test_scheduled_pruner_with_explicit_schedule_after_a_vision_pruner(model, inputs):
    # Its unused default keep (64) is not compared with the vision pruner's 32.
    with vtprune.apply(model, [vtprune.DivPrune(keep=32), vtprune.PyramidDrop(schedule=[(2, 16), (3, 8)])]) as handle:
        logits(model, inputs)
    assert handle.last.layer_tokens[0] == [32, 32, 16, 8]


class _FirstTokens(vtprune.PyramidDrop):
    """Keeps the first tokens: a choice that does not depend on which token scores."""

    def select(self, tokens):
        return torch.arange(tokens.keep)


def test_decoding_after_a_crop_below_the_pruned_length(model, inputs):
    """Assisted decoding's first forward holds the prompt plus candidates; rejecting candidates crops
    the cache below that forward's length. Decoding on from there equals never having had them."""
    pruner = _FirstTokens(schedule=[(1, 100), (3, 20)])
    ids, n = inputs["input_ids"], inputs["input_ids"].shape[1]
    candidates = torch.tensor([[40, 41, 42, 43, 44]])
    step = torch.tensor([[50]])
    with vtprune.apply(model, pruner), torch.no_grad():
        out = model(input_ids=torch.cat([ids, candidates], 1), pixel_values=inputs["pixel_values"], use_cache=True)
        cache = out.past_key_values
        cache.crop(-5)
        cropped = model(
            input_ids=step, past_key_values=cache, attention_mask=torch.ones(1, n + 1, dtype=torch.long)
        ).logits
        plain_cache = model(**inputs, use_cache=True).past_key_values
        plain = model(
            input_ids=step, past_key_values=plain_cache, attention_mask=torch.ones(1, n + 1, dtype=torch.long)
        ).logits
    torch.testing.assert_close(cropped, plain, atol=1e-5, rtol=0)


def test_llm_stage_refuses_right_padding_and_prompts_ending_with_the_image(model):
    prompt = make_prompt(model, [1, 5], [7, 8])
    right = batch_inputs(model, [prompt, prompt[:-1]])
    right["input_ids"][1] = torch.cat([right["input_ids"][1, 1:], torch.tensor([0])])
    right["attention_mask"][1] = torch.cat([right["attention_mask"][1, 1:], torch.tensor([0])])
    ends_with_image = batch_inputs(model, [make_prompt(model, [1, 5], [])])
    expected = logits(model, right)
    for name in ["fastv", "pdrop"]:
        with vtprune.apply(model, name, keep=32):
            with pytest.raises(ValueError, match="padding_side='left'"):
                logits(model, right)
            with pytest.raises(ValueError, match="ends with image tokens"):
                logits(model, ends_with_image)
    assert torch.equal(logits(model, right), expected)


def test_scheduled_pruners_need_two_decoder_layers():
    shallow = tiny_llava(layers=1)
    for name in SCHEDULED:
        with pytest.raises(ValueError, match="this decoder has one layer"):
            vtprune.apply(shallow, name, keep=8)


def test_pipeline_of_llm_pruners_drops_in_order(deep_model):
    inputs = _inputs(deep_model)
    pipeline = [vtprune.FastV(layer=1, keep=200), vtprune.PyramidDrop(schedule=[(4, 100), (6, 30)])]
    with vtprune.apply(deep_model, pipeline) as handle, torch.no_grad():
        deep_model(**inputs)
    assert handle.last.layer_tokens[0] == [576, 200, 200, 200, 100, 100, 30, 30]


@pytest.mark.parametrize(
    "pruners, message",
    [
        ([vtprune.DivPrune(keep=64), vtprune.CLSPrune(keep=32)], "at most one vision-stage pruner"),
        ([vtprune.FastV(keep=32), vtprune.DivPrune(keep=16)], "must come first"),
        ([vtprune.DivPrune(keep=64), vtprune.FastV(keep=128)], "cannot keep more"),
        ([vtprune.FastV(layer=3, keep=64), vtprune.PyramidDrop(keep=32, schedule=[(2, 16)])], "increasing layers"),
        ([vtprune.FastV(layer=1, keep=64), vtprune.PyramidDrop(schedule=[(2, 128)])], "cannot keep more"),
        ([vtprune.FastV(layer=1, keep=64), vtprune.PyramidDrop(keep=32)], "explicit schedule"),
        ([], "non-empty list"),
        (["divprune"], "pruner objects"),
    ],
)
def test_invalid_compositions_fail_at_apply(model, pruners, message):
    with pytest.raises((ValueError, TypeError), match=message):
        vtprune.apply(model, pruners)
    assert vtprune.handle_of(model) is None and "forward" not in model.__dict__


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("pdrop", {"ratio": 1.5}, "ratio must be a float in (0, 1)"),
        ("pdrop", {"schedule": [(2, 64), (1, 32)]}, "strictly increasing layers"),
        ("pdrop", {"schedule": [(2, 32), (3, 64)]}, "non-increasing keeps"),
        ("pdrop", {"schedule": [(4, 32)]}, "layers in [1, 3]"),
        ("pdrop", {"schedule": [(2, 32), (3, 0.1)]}, "all ints or all floats"),
        ("pdrop", {"schedule": []}, "at least one drop point"),
        ("transprune", {"alpha": 2}, "alpha must be a float in [0, 1]"),
        ("transprune", {"use_iga": "yes"}, "use_iga must be True or False"),
        ("adaptive", {"mass": 0}, "mass must be in (0, 1]"),
        ("adaptive", {"min_keep": 0}, "min_keep must be an int >= 1"),
        ("adaptive", {"min_keep": 8, "max_keep": 4}, "max_keep must be None or an int >= min_keep"),
        ("adaptive", {"spatial": 1.0}, "spatial must be in [0, 1)"),
        ("adaptive", {"keep": 0}, "keep must be >= 1"),
    ],
)
def test_bad_options_fail_at_apply(model, name, options, message):
    with pytest.raises((ValueError, TypeError)) as info:
        vtprune.apply(model, name, **options)
    assert message in str(info.value)
    assert vtprune.handle_of(model) is None and "forward" not in model.__dict__


def test_transprune_without_iga_ranks_by_transition_alone(deep_model):
    inputs = _inputs(deep_model)
    with vtprune.apply(deep_model, "transprune", keep=150, use_iga=False) as handle, torch.no_grad():
        deep_model(**inputs)
    assert vtprune.TransPrune(use_iga=False).signals == ("transition",)
    assert handle.last.kept_counts[0] < 576 and image_features(deep_model, inputs).shape[0] == 576


def _manual_signals_at_drops(model, inputs, drops):
    """Run the decoder by hand with the recorded drops applied and compute, at the input of each drop
    layer (before it drops), the last prompt token's and the instruction tokens' head-mean attention
    to the image tokens still present, with the layer's own projections and rotary embedding."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

    lm = model.model.language_model
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    instruction = torch.arange(int(image[-1]) + 1, ids.numel())
    drops = dict(drops)
    out = {}
    with torch.no_grad():
        h = model.get_input_embeddings()(ids[None]).clone()
        h[0, image] = image_features(model, inputs)
        positions = torch.arange(ids.numel())
        cos, sin = lm.rotary_emb(h, positions[None])
        present = torch.arange(image.numel())
        for i, layer in enumerate(lm.layers):
            if i in drops:
                attn = layer.self_attn
                x = layer.input_layernorm(h)
                q = attn.q_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
                k = attn.k_proj(x).view(1, x.shape[1], -1, attn.head_dim).transpose(1, 2)
                q, k = apply_rotary_pos_emb(q, k, cos, sin)
                k = repeat_kv(k, attn.num_key_value_groups)
                causal = positions[None, :] <= positions[:, None]
                a = (q @ k.transpose(-1, -2) * attn.scaling).masked_fill(~causal, -float("inf")).softmax(-1).mean(1)[0]
                columns = torch.isin(positions, image[present]).nonzero().flatten()
                rows = torch.isin(positions, instruction).nonzero().flatten()
                out[i] = {"last": a[-1, columns], "instruction": a[rows][:, columns].mean(0)}
                keep = torch.isin(positions, image[drops[i][0]]) | ~torch.isin(positions, image)
                h, cos, sin, positions = h[:, keep], cos[:, keep], sin[:, keep], positions[keep]
                present = drops[i][0]
            allowed = positions[None, :] <= positions[:, None]
            mask = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]
            h = layer(h, attention_mask=mask, position_embeddings=(cos, sin), position_ids=positions[None])
    return out


@pytest.mark.parametrize("name, field", [("pdrop", "attention"), ("adaptive", "instruction_attention")])
def test_scores_at_every_drop_match_a_manual_decoder(deep_model, deep_eager_model, name, field):
    inputs = _inputs(deep_model, text_after=(8, 9, 10, 11, 12, 13))
    pruner = vtprune.registry.pruner_class(name)(schedule=[(2, 200), (4, 60), (6, 20)])
    seen = []
    original_select = type(pruner).select
    object.__setattr__(pruner, "select", lambda tokens: seen.append(tokens) or original_select(pruner, tokens))
    for m in (deep_model, deep_eager_model):
        seen.clear()
        with vtprune.apply(m, pruner) as handle, torch.no_grad():
            m(**inputs)
        drops = handle.last.drops
        reference = _manual_signals_at_drops(deep_eager_model, inputs, drops)
        assert [layer for layer, _ in drops] == [2, 4, 6] and len(seen) == 3
        for tokens, (layer, _) in zip(seen, drops):
            signal = "last" if field == "attention" else "instruction"
            torch.testing.assert_close(getattr(tokens, field), reference[layer][signal], atol=2e-6, rtol=1e-4)
