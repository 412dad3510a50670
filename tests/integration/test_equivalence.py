"""Equivalences that pin pruning down on LLaVA-1.5: keep-all == unpruned, hook-pruned == shortened
prompt, batched == per-sample (sdpa == eager, for every family: test_families.py)."""

import pytest
import torch
from helpers import (
    PIPELINE,
    PRUNER_OPTIONS,
    VISION,
    apply,
    assert_kept_as_scheduled,
    greedy,
    logits,
    pruned_image_tokens,
)

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID, batch_inputs, make_prompt

ALL = sorted(PRUNER_OPTIONS) + [PIPELINE]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("keep", [576, 1.0, 10_000])
def test_keep_all_is_the_unpruned_model(model, inputs, name, keep):
    base_logits, base_tokens = logits(model, inputs), greedy(model, inputs)
    with apply(model, name, keep=keep) as handle:
        pruned_logits, pruned_tokens = logits(model, inputs), greedy(model, inputs)
        assert handle.last.kept_counts == [576]
        assert torch.equal(handle.last.kept[0], torch.arange(576))
    torch.testing.assert_close(pruned_logits, base_logits, atol=1e-5, rtol=0)
    assert torch.equal(pruned_tokens, base_tokens)


def test_text_only_input_passes_through(model):
    text = {"input_ids": torch.tensor([[1, 5, 9, 14, 3, 8]]), "attention_mask": torch.ones(1, 6, dtype=torch.long)}
    for name in ALL:
        base_logits, base_tokens = logits(model, text), greedy(model, text)
        with apply(model, name, keep=16) as handle:  # a keep every pruner reaches on the tiny models
            assert torch.equal(logits(model, text), base_logits)
            assert torch.equal(greedy(model, text), base_tokens)
            assert handle.last is None


def _manual_short_prompt_logits(model, inputs, kept, groups=()):
    """The unwrapped model fed the prompt a user would write with only the kept image tokens (and,
    after them, the merged tokens: each its group's mean)."""
    ids = inputs["input_ids"][0]
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output[0]
        no_fixed = torch.zeros(features.shape[0], dtype=torch.bool)
        stays, tokens = pruned_image_tokens(features, no_fixed, kept, groups, at_anchor=False)
        keep = torch.ones(ids.numel(), dtype=torch.bool)
        keep[ids == IMAGE_TOKEN_ID] = stays
        short_ids = ids[keep][None]
        embeds = model.get_input_embeddings()(short_ids)
        embeds[short_ids == IMAGE_TOKEN_ID] = tokens
        return model(inputs_embeds=embeds).logits


@pytest.mark.parametrize("name", VISION)
@pytest.mark.parametrize("keep", [32, 0.25])
def test_vision_stage_equals_manually_shortened_prompt(model, inputs, name, keep):
    with apply(model, name, keep=keep) as handle:
        pruned = logits(model, inputs)
        kept, groups = handle.last.kept[0], (handle.last.merged or [[]])[0]
    expected_count = 32 if keep == 32 else 144
    assert handle.last.token_counts == [expected_count] and torch.all(kept[1:] > kept[:-1])
    assert pruned.shape[1] == inputs["input_ids"].shape[1] - (576 - expected_count)
    expected = _manual_short_prompt_logits(model, inputs, kept, groups)
    torch.testing.assert_close(pruned, expected, atol=1e-5, rtol=0)


def test_vision_stage_drops_labels_of_dropped_tokens(model, inputs):
    labels = inputs["input_ids"].clone()
    labels[labels == IMAGE_TOKEN_ID] = -100
    with apply(model, "divprune", keep=16), torch.no_grad():
        out = model(**inputs, labels=labels)
    short = out.logits
    assert short.shape[1] == labels.shape[1] - 560
    # The loss only covers the text tokens, which all survive: it equals the loss on the short logits.
    text = labels[labels != -100]
    n_text_after = 5
    manual = torch.nn.functional.cross_entropy(
        torch.cat([short[0, :3], short[0, -n_text_after - 1 : -1]]),
        torch.cat([text[1:4], text[-n_text_after:]]),
    )
    torch.testing.assert_close(out.loss, manual)


def _prompts(model):
    return [
        make_prompt(model, [1, 5], [7, 8, 9]),
        make_prompt(model, [1, 5, 6, 13, 14, 15, 16], [7, 8, 9, 10, 11, 12]),
        make_prompt(model, [1], [20, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
    ]


def _per_sample_vs_batched(model, prompts, name, keep, n=8):
    batched = batch_inputs(model, prompts)
    with apply(model, name, keep=keep) as handle:
        together = greedy(model, batched, n)
        kept_together = handle.last.kept
        for i, p in enumerate(prompts):
            single = {
                "input_ids": batched["input_ids"][i : i + 1, -len(p) :],
                "attention_mask": batched["attention_mask"][i : i + 1, -len(p) :],
            }
            images_before = sum(int((batched["input_ids"][j] == IMAGE_TOKEN_ID).sum()) for j in range(i)) // 576
            n_images = int((single["input_ids"] == IMAGE_TOKEN_ID).sum()) // 576
            if n_images:
                single["pixel_values"] = batched["pixel_values"][images_before : images_before + n_images]
            alone = greedy(model, single, n)
            assert torch.equal(together[i, -n:], alone[0, -n:]), f"sample {i} differs"
            assert torch.equal(kept_together[i], handle.last.kept[0])


@pytest.mark.parametrize("name", ALL)
def test_batched_generation_equals_per_sample(model, name):
    _per_sample_vs_batched(model, _prompts(model), name, keep=40)


@pytest.mark.parametrize("name", ALL)
def test_batch_mixing_text_only_and_two_images(model, name):
    # Samples lose different numbers of tokens here, so the shortened batch is re-padded.
    prompts = [
        [1, 5, 6, 7, 8, 9, 10],
        make_prompt(model, [1, 5], [7, 8], images=2),
        make_prompt(model, [1, 4, 4], [9]),
    ]
    _per_sample_vs_batched(model, prompts, name, keep=0.1)


def test_image_in_the_middle_of_text(model):
    # Visual tokens are located by id, wherever they are; text around them is never pruned.
    p = [1] + [5] * 30 + [IMAGE_TOKEN_ID] * 576 + [6] * 30
    inputs = batch_inputs(model, [p])
    for name in ALL:
        with apply(model, name, keep=20) as handle:
            logits(model, inputs)
            assert_kept_as_scheduled(model, handle, name, 20)


def test_placeholder_count_mismatch_is_reported(model):
    inputs = batch_inputs(model, [[1, 2] + [IMAGE_TOKEN_ID] * 100], images=1)
    with (
        vtprune.apply(model, "divprune", keep=4),
        pytest.raises(ValueError, match="100 image placeholder tokens .* give 576 features"),
    ):
        logits(model, inputs)
