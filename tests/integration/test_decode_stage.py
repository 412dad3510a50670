"""The decode stage: a cache policy removes visual entries from the KV cache between decoding steps.
MustDrop's output-aware cache after a multi-drop LLM-stage pruner equals a hand-run decoder whose
generated tokens see, from the first drop on, only the tokens that reached the last layer; the
caches hold exactly those entries; batched == per-sample; beam search; continuing a cache; what is
refused. The family matrix (test_families.py, test_equivalence.py) runs the policy on every family."""

import pytest
import torch
from helpers import greedy
from references import reference_generate

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID, batch_inputs, make_prompt

SCHEDULE = [(1, 64), (2, 32), (3, 16)]  # the tiny LLaVA's 4 decoder layers


def cached_pdrop(schedule=SCHEDULE, **options):
    return [vtprune.PyramidDrop(schedule=schedule), vtprune.MustDropCache(**options)]


def generate(model, inputs, n=5, **kwargs):
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=n, do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs
        )


def test_generated_tokens_see_only_the_final_visual_tokens_from_the_first_drop_on(model, inputs):
    with vtprune.apply(model, cached_pdrop()) as handle:
        out = generate(model, inputs)
        stats = handle.last
    final, drops = stats.kept[0], [(layer, kept[0]) for layer, kept in stats.drops]
    assert final.numel() == 16
    policy, plain = [], []
    expected = reference_generate(model, inputs, drops, 5, held={1: final, 2: final, 3: final}, scores=policy)
    reference_generate(model, inputs, drops, 5, scores=plain)
    assert torch.equal(out.sequences, expected)
    for got, want in zip(out.logits, policy):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
    # The policy changes what decoding sees (the first logits come from the prefill, before it acts).
    assert not torch.allclose(policy[1], plain[1], atol=1e-3)
    assert stats.decode_tokens == [[[576, 16, 16, 16]] * 4]


def test_each_layer_holds_its_text_the_final_visual_tokens_and_the_generated_ones(model, inputs):
    prompt = inputs["input_ids"].shape[1]
    with vtprune.apply(model, cached_pdrop()):
        out = generate(model, inputs, n=4)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    text = prompt - 576
    assert lengths == [prompt + 3] + [text + 16 + 3] * 3
    with vtprune.apply(model, cached_pdrop(layer=3)):  # layers 1 and 2 keep what entered them
        out = generate(model, inputs, n=4)
    assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [
        prompt + 3,
        text + 67,
        text + 35,
        text + 19,
    ]


def test_without_a_later_drop_the_cache_policy_changes_nothing(model, inputs):
    with vtprune.apply(model, vtprune.FastV(layer=2, keep=24)):
        expected = generate(model, inputs)
    with vtprune.apply(model, [vtprune.FastV(layer=2, keep=24), vtprune.MustDropCache()]) as handle:
        out = generate(model, inputs)
    assert torch.equal(out.sequences, expected.sequences)
    assert handle.last.decode_tokens == [[[576, 576, 24, 24]] * 4]


def test_batched_equals_per_sample_with_different_final_tokens(model):
    prompts = [
        make_prompt(model, [1, 5], [7, 8, 9]),
        make_prompt(model, [1, 5, 6, 13, 14, 15, 16], [7, 8, 9, 10, 11, 12]),
    ]
    batched = batch_inputs(model, prompts)
    with vtprune.apply(model, cached_pdrop()) as handle:
        together = generate(model, batched)
        held_together = handle.last.decode_tokens
        for i, p in enumerate(prompts):
            single = {
                "input_ids": batched["input_ids"][i : i + 1, -len(p) :],
                "attention_mask": batched["attention_mask"][i : i + 1, -len(p) :],
                "pixel_values": batched["pixel_values"][i : i + 1],
            }
            alone = generate(model, single)
            assert torch.equal(together.sequences[i, -5:], alone.sequences[0, -5:]), f"sample {i} differs"
            assert held_together[i] == handle.last.decode_tokens[0]
            for got, want in zip(together.logits, alone.logits):
                torch.testing.assert_close(got[i], want[0], atol=1e-4, rtol=0)


def test_beam_search_and_sampling_run_with_the_policy_and_equal_per_sample(model):
    prompts = [make_prompt(model, [1, 5], [7, 8, 9]), make_prompt(model, [1, 4, 4], [9])]
    batched = batch_inputs(model, prompts)
    with vtprune.apply(model, cached_pdrop()):
        with torch.no_grad():
            together = model.generate(**batched, max_new_tokens=5, num_beams=3, do_sample=False)
            for i, p in enumerate(prompts):
                single = {
                    "input_ids": batched["input_ids"][i : i + 1, -len(p) :],
                    "pixel_values": batched["pixel_values"][i : i + 1],
                }
                alone = model.generate(**single, max_new_tokens=5, num_beams=3, do_sample=False)
                assert torch.equal(together[i, -5:], alone[0, -5:])
            torch.manual_seed(0)
            sampled = model.generate(**batched, max_new_tokens=5, do_sample=True)
    assert sampled.shape == (2, batched["input_ids"].shape[1] + 5)


def test_continuing_a_cache_equals_generating_at_once(model, inputs):
    with vtprune.apply(model, cached_pdrop()) as handle:
        whole = greedy(model, inputs, n=8)
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
            rest = model.generate(
                input_ids=first.sequences,
                past_key_values=first.past_key_values,
                max_new_tokens=4,
                do_sample=False,
            )
        steps = len(handle.last.decode_tokens[0])
    assert torch.equal(rest, whole)
    assert steps == 3 + 4  # the continuation's forwards are decode steps of the same cache


def test_remove_restores_the_model_and_the_output_aware_cache_needs_a_dynamic_cache(model, inputs):
    expected = greedy(model, inputs)
    with vtprune.apply(model, cached_pdrop()):
        with pytest.raises(ValueError, match="static cache"):
            with torch.no_grad():
                model.generate(**inputs, max_new_tokens=3, cache_implementation="static")
    assert torch.equal(greedy(model, inputs), expected)


def test_a_cache_policy_is_checked_before_the_model_is_touched(model):
    with pytest.raises(ValueError, match="must come last"):
        vtprune.Pipeline([vtprune.MustDropCache(), vtprune.FastV(layer=2, keep=8)])
    with pytest.raises(ValueError, match="at most one cache policy"):
        vtprune.Pipeline([vtprune.MustDropCache(), vtprune.MustDropCache()])
    with pytest.raises(ValueError, match="layer must be an int or None|layer must be an int"):
        vtprune.MustDropCache(layer="2")
    with pytest.raises(ValueError, match=r"layer must be an int in \[1, 3\]"):
        vtprune.apply(model, cached_pdrop(layer=0))
    assert vtprune.handle_of(model) is None


def test_placeholders_anywhere_in_the_prompt(model):
    # Visual entries are found from the prompt's image token ids, wherever the image sits.
    p = [1] + [5] * 30 + [IMAGE_TOKEN_ID] * 576 + [6] * 30
    inputs = batch_inputs(model, [p])
    with vtprune.apply(model, cached_pdrop()) as handle:
        out = generate(model, inputs, n=3)
    lengths = [layer.keys.shape[-2] for layer in out.past_key_values.layers]
    assert lengths == [len(p) + 2] + [61 + 16 + 2] * 3
    assert handle.last.decode_tokens == [[[576, 16, 16, 16]] * 2]


def test_a_cache_policy_refuses_cache_layers_it_cannot_edit_before_the_model_runs(model, inputs):
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    cache = DynamicCache(config=model.config.text_config)
    cache.layers[2] = DynamicSlidingWindowLayer(sliding_window=4096)
    with vtprune.apply(model, cached_pdrop()):
        with pytest.raises(ValueError, match="DynamicSlidingWindowLayer layers: use the default DynamicCache"):
            with torch.no_grad():
                model(**inputs, past_key_values=cache)
    assert cache.get_seq_length() == 0  # refused before the model ran
