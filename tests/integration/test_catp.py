"""CATP on prompts of several images (two demonstrations and a query) and of one: its first stage
against the greedy rule written out, fed to a hand-shortened prompt; its drops inside the model
against the paper's scores computed from an eager model's returned attention and hidden states; a
generation against a hand-run decoder; the budget arithmetic; the joint drops' checks; options. The
family matrix runs it everywhere."""

import pytest
import torch
import torch.nn.functional as F
from helpers import prompt_with_image_tokens_at
from references import naive_facility_location, reference_generate

import vtprune
from vtprune.core.tokens import ModelInfo
from vtprune.pruners.catp import CATPPlan
from vtprune.testing import IMAGE_TOKEN_ID, batch_inputs, tiny_llava

N = 576  # the tiny LLaVA's tokens per image
TEXTS = ([7, 8, 9], [10, 11], [12, 13, 14])  # each image's text: a demonstration's, a demonstration's, the query's


def prompt_of(images: int) -> list[int]:
    ids = [1, 5]
    for text in TEXTS[-images:]:
        ids += [IMAGE_TOKEN_ID] * N + text
    return ids


@pytest.fixture(scope="module")
def three(model):
    return batch_inputs(model, [prompt_of(3)])


def all_features(model, inputs):
    with torch.no_grad():
        return torch.cat(list(model.model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output))


@torch.no_grad()
def test_the_first_stage_is_greedy_coverage_plus_alignment_fed_to_a_shortened_prompt(model, three):
    with vtprune.apply(model, vtprune.CATPSelect(keep=64)) as handle:
        pruned = model(**three).logits
    kept = handle.last.kept[0]
    features = all_features(model, three)
    expected = []
    for i, text in enumerate(TEXTS):
        words = model.get_input_embeddings()(torch.tensor(text))
        chosen = naive_facility_location(features[i * N : (i + 1) * N], (N + 64) // 2, words, 0.7)
        expected.append(chosen + i * N)
    assert torch.equal(kept, torch.cat(expected))
    assert handle.last.token_counts == [3 * 320]
    reference = prompt_with_image_tokens_at(model, three, kept, features[kept])
    torch.testing.assert_close(pruned, reference, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_an_image_with_no_text_of_its_own_shares_the_next_one(model):
    """Two images side by side, then the question: both are aligned with the question."""
    inputs = batch_inputs(model, [[1, 5] + [IMAGE_TOKEN_ID] * (2 * N) + [12, 13, 14]])
    with vtprune.apply(model, vtprune.CATPSelect(keep=0.5, align=5.0)) as handle, torch.no_grad():
        model(**inputs)
    features = all_features(model, inputs)
    words = model.get_input_embeddings()(torch.tensor([12, 13, 14]))
    first = naive_facility_location(features[:N], 432, words, 5.0)
    assert torch.equal(handle.last.kept[0][:432], first)


def query_scores(eager_model, inputs, k, relevance=0.6):
    """The paper's Eq. 8-9 on the unpruned model: the demonstrations' image tokens' scores after layer k."""
    out = eager_model(**inputs, output_hidden_states=True, output_attentions=True)
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    grow = (out.attentions[k][0, :, -1].mean(0) - out.attentions[k - 1][0, :, -1].mean(0)).clamp_min(0)
    h = out.hidden_states[k + 1][0]
    query = torch.cat([image[-N:], torch.arange(int(image[-1]) + 1, ids.numel())])
    context = image[:-N]
    return grow[context] + relevance * F.cosine_similarity(h[context], h[query].mean(0)[None], dim=-1)


@torch.no_grad()
def test_the_demonstrations_are_ranked_together_then_the_query_by_the_context_left(model, eager_model, three):
    k = 1  # 6/32 of the tiny model's 4 layers
    scores = query_scores(eager_model, three, k)
    with vtprune.apply(model, vtprune.CATPDrop(keep=100)) as handle:
        out = model(**three, output_hidden_states=True)
    (first, kept_first), (second, kept_second) = handle.last.drops
    assert (first, second) == (k + 1, k + 2)
    context = kept_first[0][kept_first[0] < 2 * N]
    assert torch.equal(context, scores.topk(200).indices.sort().values)  # 100 per demonstration, shared
    assert torch.equal(kept_first[0][context.numel() :], torch.arange(2 * N, 3 * N))
    # After layer k+1: the query image by its likeness to the mean of the demonstrations' tokens left
    image = (three["input_ids"][0] == IMAGE_TOKEN_ID).nonzero().flatten()
    h = out.hidden_states[k + 2][0]
    likeness = F.cosine_similarity(h[image[-N:]], h[image[context]].mean(0)[None], dim=-1)
    assert torch.equal(kept_second[0], torch.cat([context, 2 * N + likeness.topk(100).indices.sort().values]))
    assert handle.last.layer_tokens[0] == [3 * N, 3 * N, 200 + N, 300]


def test_generation_equals_a_hand_run_decoder(model, three):
    with vtprune.apply(model, vtprune.CATP(keep=32)) as handle, torch.no_grad():
        out = model.generate(**three, max_new_tokens=5, do_sample=False)
    (_, entering), *drops = [(layer, kept[0]) for layer, kept in handle.last.drops]
    assert handle.last.layer_tokens[0] == [3 * 304, 3 * 304, 64 + 304, 96]
    assert [layer for layer, _ in drops] == [2, 3]
    # The hand-run decoder on the prompt written with the first stage's tokens, drops indexed among them
    among = {int(t): j for j, t in enumerate(entering)}
    drops = [(layer, torch.tensor([among[int(t)] for t in kept])) for layer, kept in drops]
    features = all_features(model, three)[entering]
    expected = reference_generate(model, prompt_with_first_stage(three, entering), drops, 5, features=features)
    assert torch.equal(out[0, -5:], expected[0, -5:])


def prompt_with_first_stage(inputs, kept):
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    stays = torch.ones(ids.numel(), dtype=torch.bool)
    stays[image] = False
    stays[image[kept]] = True
    return {"input_ids": ids[stays][None], "pixel_values": inputs["pixel_values"]}


@torch.no_grad()
def test_one_image_is_ranked_by_the_text_after_it(model):
    inputs = batch_inputs(model, [prompt_of(1)])
    with vtprune.apply(model, vtprune.CATPDrop(keep=50)) as handle:
        model(**inputs)
        out = model(**inputs, output_hidden_states=True)
    ((layer, kept),) = handle.last.drops
    ids = inputs["input_ids"][0]
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    h = out.hidden_states[3][0]  # entering layer 3 = K + 2, nothing dropped before
    likeness = F.cosine_similarity(h[image], h[int(image[-1]) + 1 :].mean(0)[None], dim=-1)
    assert layer == 3 and torch.equal(kept[0], likeness.topk(50).indices.sort().values)


def info(layers):
    return ModelInfo(
        num_decoder_layers=layers, num_tower_layers=24, tower_has_cls=True, tower_name="clip", feature_layers=(22,)
    )


def test_the_budgets_are_the_papers():
    for keep, entering in ((192, 384), (128, 352), (64, 320)):  # R = 2/3, 7/9, 8/9 on LLaVA's 576 tokens
        plan = CATPPlan(keep)
        assert plan.entering(576) == entering and plan.final(entering) == keep
    plan = CATPPlan(1 / 3)
    assert plan.entering(576) == 384 and plan.final(384) == 192
    assert CATPPlan(1.0).entering(576) == 576 and CATPPlan(1.0).final(576) == 576
    assert CATPPlan(1000).entering(576) == 576
    drop = vtprune.CATPDrop(keep=64)
    drop.check(info(32))
    assert drop.plan.k == 6
    points = drop.sample_drop_points(info(32), [320, 300, 320])
    assert [[(p.layer, p.keep) for p in image] for image in points] == [[(7, 64)], [(7, 64)], [(8, 64)]]
    assert drop.drop_points(info(32), 320) == points[2]
    assert vtprune.CATPDrop(keep=1.0).sample_drop_points(info(32), [576, 576]) == [[], []]
    for layers, k in ((40, 8), (30, 6), (4, 1)):
        plan = CATPPlan(64)
        plan.resolve(info(layers))
        assert plan.k == k


def test_joint_answers_are_checked(model, three):
    class Greedy(vtprune.CATPDrop):
        def reduce_sample(self, sample):
            return [vtprune.pruners.base.Reduction(torch.arange(len(t))) for t in sample.images]

    with vtprune.apply(model, Greedy(keep=100)), pytest.raises(ValueError, match="their budget is 200"):
        model(**three)

    class Careless(vtprune.CATPDrop):
        def reduce_sample(self, sample):
            return [vtprune.pruners.base.Reduction(torch.arange(1)) for _ in sample.images]

    with vtprune.apply(model, Careless(keep=100)), pytest.raises(ValueError, match="does not drop here"):
        model(**three)
    assert torch.equal(model(**three).logits, model(**three).logits)  # the model works again


def test_options_are_checked(model):
    cases = [
        (lambda: vtprune.CATP(align=-1), "align must be a number >= 0"),
        (lambda: vtprune.CATP(relevance="high"), "relevance must be a number >= 0"),
        (lambda: vtprune.CATP(layer=True), "layer must be an int"),
        (lambda: vtprune.CATP(keep=0), "keep must be >= 1"),
        (lambda: vtprune.CATP(budget="per_frame"), "a video takes one role as one image: only budget='per_video'"),
        (lambda: vtprune.apply(model, "catp", layer=2), r"layer must be in \[1, 1\] for this 4-layer decoder"),
        (lambda: vtprune.apply(tiny_llava(layers=3), "catp"), "at least 4 layers"),
    ]
    for make, message in cases:
        with pytest.raises(ValueError, match=message):
            make()
    assert vtprune.handle_of(model) is None
