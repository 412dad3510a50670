"""ToDRE: greedy k-center diversity before the LLM, then every visual token dropped in the last layers
when the instruction pays them little attention."""

import pytest
import torch
from helpers import greedy, logits
from references import eager_cls_scores, image_features, reference_generate

import vtprune
from vtprune.ops import k_center
from vtprune.testing import IMAGE_TOKEN_ID, surviving_positions


def short_prompt(inputs, kept):
    """The prompt holding only the kept image tokens."""
    ids = inputs["input_ids"][0]
    return {"input_ids": ids[surviving_positions(ids, kept)][None]}


def test_the_diversity_stage_is_k_center_seeded_with_the_top_cls_token(eager_model, inputs):
    with vtprune.apply(eager_model, "todre", keep=40, threshold=0.0) as handle, torch.no_grad():
        eager_model(**inputs)
    pivot = int(eager_cls_scores(eager_model, inputs, [1]).argmax())  # the feature layer (encoder layer 1)
    expected = k_center(image_features(eager_model, inputs), 40, first=pivot).sort().values
    assert torch.equal(handle.last.kept[0], expected)
    assert handle.last.layer_tokens[0] == [40] * 4


def instruction_share(model, inputs, kept, layer):
    """The attention the instruction (the text after the image) gives the kept image tokens at decoder
    layer ``layer``: head and query mean, summed over the image, from the eager model's own maps."""
    short = short_prompt(inputs, kept)
    ids = short["input_ids"][0]
    with torch.no_grad():
        embeds = model.get_input_embeddings()(short["input_ids"])
        embeds[0, ids == IMAGE_TOKEN_ID] = image_features(model, inputs)[kept]
        maps = model(inputs_embeds=embeds, output_attentions=True).attentions[layer][0]  # (H, L, L)
    image = (ids == IMAGE_TOKEN_ID).nonzero().flatten()
    instruction = torch.arange(int(image[-1]) + 1, ids.numel())
    return float(maps.mean(0)[instruction][:, image].mean(0).sum())


@pytest.mark.parametrize("side", ["below", "above"])
def test_the_late_drop_follows_the_instructions_attention_share(eager_model, inputs, side):
    with vtprune.apply(eager_model, "todre", keep=40, threshold=0.0) as handle, torch.no_grad():
        eager_model(**inputs)
    kept = handle.last.kept[0]
    share = instruction_share(eager_model, inputs, kept, layer=2)  # measured at layer 2, drops before 3
    threshold = share + 1e-4 if side == "below" else share - 1e-4
    with vtprune.apply(eager_model, "todre", keep=40, threshold=threshold) as handle, torch.no_grad():
        eager_model(**inputs)
    expected_last = 0 if side == "below" else 40
    assert handle.last.layer_tokens[0] == [40, 40, 40, expected_last]
    assert handle.last.kept_counts == [expected_last]


def test_generation_after_the_late_drop_equals_the_reference(model, inputs):
    """Visual tokens gone from layer 3 on, in the prompt and in every decode step."""
    with vtprune.apply(model, "todre", keep=32, threshold=1.0) as handle:
        tokens = greedy(model, inputs, n=6)
        (_, vision_kept), (layer, late) = handle.last.drops
    assert layer == 3 and late[0].numel() == 0
    short = short_prompt(inputs, vision_kept[0])
    features = image_features(model, inputs)[vision_kept[0]]
    expected = reference_generate(model, short, [(3, torch.zeros(0, dtype=torch.long))], 6, features=features)
    assert torch.equal(tokens[0, -6:], expected[0, -6:])


def test_batched_drop_all_equals_per_sample(model):
    from vtprune.testing import batch_inputs, make_prompt

    prompts = [make_prompt(model, [1, 5], [8, 9, 10]), [1, 5, 6, 7, 8], make_prompt(model, [1, 4, 4, 6], [9, 11])]
    batch = batch_inputs(model, prompts)
    images = {0: batch["pixel_values"][0:1], 2: batch["pixel_values"][1:2]}  # the batch's image of each prompt
    with vtprune.apply(model, "todre", keep=16, threshold=1.0) as handle:
        together = greedy(model, batch)
        assert handle.last.kept_counts == [0, 0, 0] and handle.last.layer_tokens[0] == [16, 16, 16, 0]
        for i, prompt in enumerate(prompts):
            alone = batch_inputs(model, [prompt], images=int(i in images))
            if i in images:
                alone["pixel_values"] = images[i]
            assert torch.equal(together[i, -8:], greedy(model, alone)[0, -8:]), f"sample {i}"


def test_keep_all_with_no_late_drop_is_the_unpruned_model(model, inputs):
    base = logits(model, inputs)
    with vtprune.apply(model, "todre", keep=1.0, threshold=0.0):
        torch.testing.assert_close(logits(model, inputs), base, atol=1e-5, rtol=0)


def test_options_are_checked(model):
    with pytest.raises(ValueError, match="threshold must be a float in"):
        vtprune.ToDRE(keep=64, threshold=2)
    with pytest.raises(ValueError, match="layer must be an int"):
        vtprune.apply(model, "todre", keep=64, layer=4)  # the tiny decoder has 4 layers
    with pytest.raises(ValueError, match="budget must be one of"):
        vtprune.ToDRE(keep=64, budget="per_scene")
    assert vtprune.ToDRE(keep=64).options() == {"keep": 64, "layer": None, "threshold": 0.1, "budget": "per_frame"}


def test_sdpa_and_eager_agree_with_the_late_drop(model, eager_model, inputs):
    results = []
    for m in (model, eager_model):
        with vtprune.apply(m, "todre", keep=32, threshold=1.0) as handle:
            results.append((logits(m, inputs), handle.last.layer_tokens, greedy(m, inputs)))
    (sdpa_logits, sdpa_layers, sdpa_tokens), (eager_logits, eager_layers, eager_tokens) = results
    assert sdpa_layers == eager_layers == [[32, 32, 32, 0]]
    torch.testing.assert_close(sdpa_logits, eager_logits, atol=1e-4, rtol=0)
    assert torch.equal(sdpa_tokens, eager_tokens)


def test_remove_after_the_late_drop_restores_the_model(model, inputs):
    base = logits(model, inputs)
    handle = vtprune.apply(model, "todre", keep=32, threshold=1.0)
    greedy(model, inputs)
    handle.remove()
    assert vtprune.handle_of(model) is None
    assert torch.equal(logits(model, inputs), base)
