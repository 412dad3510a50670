"""CDPruner on the tiny LLaVA: the kept tokens against the rule written out in float64 (relevance to
the image's own text, determinants computed afresh), the pruned logits against a hand-shortened
prompt, an instruction before its image, a batch of different questions, theta and the options. The
family matrix runs it everywhere."""

import pytest
import torch
from helpers import prompt_with_image_tokens_at
from references import image_features, naive_conditional_dpp, naive_instruction_relevance

import vtprune
from vtprune.testing import IMAGE_TOKEN_ID, batch_inputs

N = 576  # the tiny LLaVA's tokens per image
QUESTION = [8, 9, 10]  # ids 0, 1, 2 and 31 are the tiny config's special tokens: never instruction text


def words(model, ids):
    with torch.no_grad():
        return model.get_input_embeddings()(torch.tensor(ids))


@torch.no_grad()
@pytest.mark.parametrize("keep", [1, 16, 40])
def test_kept_tokens_follow_the_rule_and_feed_a_shortened_prompt(model, keep):
    inputs = batch_inputs(model, [[1, 5] + [IMAGE_TOKEN_ID] * N + QUESTION + [2]])
    with vtprune.apply(model, "cdpruner", keep=keep) as handle:
        pruned = model(**inputs).logits
    x = image_features(model, inputs)
    quality = naive_instruction_relevance(x, words(model, QUESTION))
    kept = handle.last.kept[0]
    assert torch.equal(kept, naive_conditional_dpp(x, quality, keep))
    torch.testing.assert_close(pruned, prompt_with_image_tokens_at(model, inputs, kept, x[kept]), rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_an_instruction_before_its_image_is_read_when_none_follows(model):
    inputs = batch_inputs(model, [[1, 5, 6, 7] + [IMAGE_TOKEN_ID] * N])
    with vtprune.apply(model, "cdpruner", keep=12) as handle:
        model(**inputs)
    x = image_features(model, inputs)
    quality = naive_instruction_relevance(x, words(model, [5, 6, 7]))
    assert torch.equal(handle.last.kept[0], naive_conditional_dpp(x, quality, 12))


@torch.no_grad()
def test_the_question_steers_the_selection_and_a_batch_equals_each_sample(model):
    prompts = [[1, 5] + [IMAGE_TOKEN_ID] * N + q for q in ([8, 9, 10], [20, 21], [8, 9, 10])]
    inputs = batch_inputs(model, prompts)
    inputs["pixel_values"][2] = inputs["pixel_values"][1]  # the same image as sample 1, the first question
    with vtprune.apply(model, "cdpruner", keep=16) as handle:
        model(**inputs)
        batched = handle.last.kept
        alone = []
        for b in range(3):
            model(**{k: v[b : b + 1] for k, v in inputs.items()})
            alone.append(handle.last.kept[0])
    assert all(torch.equal(a, b) for a, b in zip(batched, alone))
    assert not torch.equal(batched[1], batched[2])  # one image, two questions, two selections


@torch.no_grad()
def test_theta_zero_is_plain_diversity(model, inputs):
    with vtprune.apply(model, vtprune.CDPruner(keep=10, theta=0.0)) as handle:
        model(**inputs)
    x = image_features(model, inputs)
    assert torch.equal(handle.last.kept[0], naive_conditional_dpp(x, torch.ones(N), 10))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"theta": 1.0}, r"theta must be None or a number in \[0, 1\), got 1.0"),
        ({"theta": -0.1}, r"theta must be None or a number in \[0, 1\)"),
        ({"theta": True}, r"theta must be None or a number in \[0, 1\)"),
        ({"negate": "yes"}, "negate must be True or False, got 'yes'"),
    ],
)
def test_options_are_checked(options, message):
    with pytest.raises(ValueError, match=message):
        vtprune.CDPruner(**options)
