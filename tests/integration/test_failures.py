"""A forward that fails halfway leaves the model as it was, and the handle usable."""

from dataclasses import dataclass

import pytest
import torch
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
