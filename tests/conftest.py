"""Fixtures: the tiny LLaVA models (built once per session) and a one-image prompt."""

import pytest
import torch

from vtprune.testing import batch_inputs, make_prompt, tiny_llava

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def model():
    return tiny_llava(attn="sdpa")


@pytest.fixture(scope="session")
def eager_model():
    return tiny_llava(attn="eager")


@pytest.fixture
def prompt(model):
    return make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11, 12])


@pytest.fixture
def inputs(model, prompt):
    return batch_inputs(model, [prompt])
