"""The LLM-stage signal table (vtprune.core.llm_signals): what each signal fills, the check at apply()
time, and the rows an attention signal reads."""

import dataclasses
from dataclasses import dataclass

import pytest
import torch

import vtprune
from vtprune.core.llm_signals import SIGNALS, ScoringInput, check_signals
from vtprune.core.tokens import ModelInfo, PromptTokens

INFO = ModelInfo(
    num_decoder_layers=8, num_tower_layers=4, tower_has_cls=True, tower_name="CLIPVisionModel", feature_layers=(2,)
)


def test_every_signal_fills_a_field_of_prompt_tokens():
    fields = {f.name for f in dataclasses.fields(PromptTokens)}
    assert {s.field for s in SIGNALS.values()} <= fields
    assert len({s.field for s in SIGNALS.values()}) == len(SIGNALS)


@pytest.mark.parametrize("name", vtprune.available())
def test_every_registered_llm_pruner_asks_only_for_known_signals(name):
    pruner = vtprune.registry.pruner_class(name)()
    for stage in getattr(pruner, "llm", [pruner] if pruner.stage == "llm" else []):
        check_signals(stage.name, stage.signals)


@dataclass
class _Misspelt(vtprune.FastV):
    name = "misspelt"
    signals = ("lats",)


def test_a_misspelt_signal_is_refused_by_the_check_apply_runs_with_the_valid_ones_listed():
    with pytest.raises(ValueError) as info:
        vtprune.Pipeline([_Misspelt(keep=4)]).check(INFO)
    message = str(info.value)
    assert "'misspelt' pruner asks for unknown signals ['lats']" in message
    assert all(f"'{name}'" in message for name in SIGNALS)


def test_signals_must_be_a_tuple_of_names():
    with pytest.raises(ValueError, match="must be a tuple of signal names"):
        check_signals("x", "last")


def test_rows_follow_a_compacted_sequence_and_skip_padding():
    # Original prompt of 10 tokens; the current sequence is 7 long (3 visual tokens dropped), right-aligned.
    scoring = ScoringInput(
        decoder=None,
        layer=None,
        hidden=torch.zeros(2, 7, 4),
        position_embeddings=(),
        key_mask=None,
        last=9,
        length=10,
        instruction_starts=[6, 8],
        prompt_mask=torch.tensor([[1] * 10, [1] * 8 + [0, 1]]).bool(),
    )
    assert scoring.row(9) == 6 and scoring.row(6) == 3
    rows = scoring.instruction_rows()
    assert rows[0].tolist() == [3, 4, 5, 6]
    assert rows[1].tolist() == [6]  # position 8 is masked: only position 9 reads
