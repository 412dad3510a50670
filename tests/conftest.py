"""Fixtures: the tiny LLaVA models (built once per session) and a one-image prompt."""

import os

# The kernel tests run Triton in its CPU interpreter, which Triton only honours if the variable is set
# before it is first imported, and importing timm (as the timm tests do) imports Triton.
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

from vtprune.testing import batch_inputs, make_prompt, tiny_llava  # noqa: E402

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
