"""Half-precision models: pruning runs, and scores are computed in fp32."""

import pytest
import torch
from helpers import PRUNER_OPTIONS, assert_kept_as_scheduled
from references import image_features, naive_max_min_diversity

import vtprune
from vtprune.testing import batch_inputs, make_prompt, tiny_llava


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16])
def half_model(request):
    return tiny_llava(dtype=request.param)


@pytest.mark.parametrize("name", sorted(PRUNER_OPTIONS))
def test_half_precision_models_prune_and_generate(half_model, name):
    inputs = batch_inputs(half_model, [make_prompt(half_model, [1, 5], [6, 7, 8])])
    with vtprune.apply(half_model, name, keep=40, **PRUNER_OPTIONS[name]) as handle, torch.no_grad():
        tokens = half_model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert tokens.shape == (1, inputs["input_ids"].shape[1] + 4)
    assert_kept_as_scheduled(half_model, handle, name, 40)


def test_divprune_on_half_features_ranks_in_fp32(half_model):
    inputs = batch_inputs(half_model, [make_prompt(half_model, [1, 5], [6, 7, 8])])
    with vtprune.apply(half_model, "divprune", keep=30) as handle, torch.no_grad():
        half_model(**inputs)
    features = image_features(half_model, inputs)
    assert features.dtype == half_model.dtype
    # The naive rule in fp64 on the same half-precision features: fp32 scoring agrees with it,
    # where ranking in half precision would tie and diverge.
    assert torch.equal(handle.last.kept[0], naive_max_min_diversity(features.float(), 30))
