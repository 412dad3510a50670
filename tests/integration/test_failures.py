"""A forward that fails halfway leaves the model as it was, and the handle usable."""

from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES
from helpers import greedy, logits

import vtprune
from vtprune.pruners.base import PromptTokens, VisionPruner, VisionTokens


@dataclass
class ExplodingVision(VisionPruner):
    name = "exploding-vision"

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        raise RuntimeError("boom")


@dataclass
class ExplodingFastV(vtprune.FastV):
    def select(self, tokens: PromptTokens) -> torch.Tensor:
        raise RuntimeError("boom")


@pytest.mark.parametrize("pruner", [ExplodingVision(keep=8), ExplodingFastV(keep=8)])
def test_failure_mid_forward_leaves_model_intact(model, inputs, pruner):
    base_logits, base_tokens = logits(model, inputs), greedy(model, inputs)
    handle = vtprune.apply(model, pruner)
    with pytest.raises(RuntimeError, match="boom"):
        logits(model, inputs)
    with pytest.raises(RuntimeError, match="boom"):
        greedy(model, inputs)
    # Text-only calls still run exactly through the (still applied) pruner's patches.
    text = {"input_ids": torch.tensor([[1, 4, 9]])}
    handle_text = logits(model, text)
    handle.remove()
    assert torch.equal(logits(model, text), handle_text)
    assert torch.equal(logits(model, inputs), base_logits)
    assert torch.equal(greedy(model, inputs), base_tokens)


def test_working_pruner_after_a_failed_call(model, inputs):
    with vtprune.apply(model, "fastv", keep=16) as handle:
        bad = dict(inputs, input_ids=inputs["input_ids"][:, :-600])  # placeholders no longer match
        with pytest.raises(ValueError, match="do not match"):
            logits(model, bad)
        logits(model, inputs)
        assert handle.last.kept_counts == [16]


def test_numpy_keep_is_accepted(model):
    import numpy as np

    assert vtprune.DivPrune(keep=np.int64(5)).keep == 5
    assert vtprune.DivPrune(keep=np.float32(0.5)).keep == 0.5


THREE_FAMILIES = [f for f in FAMILIES if f.name in ("llava", "llava_next", "qwen2_vl")]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
@pytest.mark.parametrize(
    "family", [f for f in FAMILIES if f.name in ("llava", "llava_next", "qwen2_vl")], ids=lambda f: f.name
)
def test_non_finite_pixels_are_refused_by_the_vision_stage_not_miscounted(family, value):
    model = family.model()
    inputs, _ = family.batch(model, [([1, 5, 6, 7], [8, 9, 10], 1)])
    inputs["pixel_values"] = inputs["pixel_values"].clone()
    inputs["pixel_values"].view(-1)[:50] = value
    with vtprune.apply(model, "divprune", keep=16):
        with pytest.raises(ValueError, match="non-finite features"):
            greedy(model, inputs)


@dataclass
class Repeating(VisionPruner):
    name = "repeating"

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        return torch.tensor([0, 0, 1])


def test_a_pruner_that_repeats_a_token_is_stopped_with_a_message(model, inputs):
    expected = logits(model, inputs)
    with vtprune.apply(model, Repeating(keep=8)):
        with pytest.raises(ValueError, match="'repeating' pruner must keep at most 8 ascending, distinct indices"):
            logits(model, inputs)
    assert torch.equal(logits(model, inputs), expected)


@dataclass
class RepeatingFastV(vtprune.FastV):
    def select(self, tokens: PromptTokens) -> torch.Tensor:
        return torch.tensor([0, 0])


def test_an_llm_stage_pruner_that_repeats_a_token_is_stopped_with_a_message(model, inputs):
    expected = logits(model, inputs)
    with vtprune.apply(model, RepeatingFastV(keep=8)):
        with pytest.raises(ValueError, match=r"pruner's select\(\) must return at most 8 ascending, distinct"):
            logits(model, inputs)
    assert torch.equal(logits(model, inputs), expected)
