"""Pruners as plain dataclasses, no model: option checks at construction, the scorer base, and rules
run directly on VisionTokens / PromptTokens."""

import dataclasses

import pytest
import torch

import vtprune
from vtprune.ops import farthest_points, mass_spread
from vtprune.pruners.base import PromptTokens, VisionPruner, VisionTokens, keep_from_text
from vtprune.pruners.todre import ToDREDiversity, ToDRERelevance


@pytest.mark.parametrize("text, value", [("64", 64), ("0.25", 0.25), ("1", 1), ("1.0", 1.0)])
def test_keep_from_text_reads_ints_and_fractions(text, value):
    got = keep_from_text(text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "text, message", [("0", ">= 1"), ("1.5", "in (0, 1]"), ("abc", "int or a fraction"), ("-2", ">= 1")]
)
def test_keep_from_text_says_what_is_allowed(text, message):
    with pytest.raises(ValueError) as info:
        keep_from_text(text)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: vtprune.DivPrune(keep=8, budget="per_clip"), "budget must be one of"),
        (lambda: vtprune.DivPrune(keep=8, crop_budget="per_crop"), "crop_budget must be one of"),
        (lambda: vtprune.CLSPrune(keep=8, strategy="best"), "strategy must be one of"),
        (lambda: vtprune.CLSPrune(keep=8, layers=[]), "layers must be a non-empty list"),
        (lambda: vtprune.FastV(keep=8, layer="two"), "layer must be an int"),
        (lambda: vtprune.PyramidDrop(keep=8, ratio=1.0), "ratio must be a float in (0, 1)"),
        (lambda: vtprune.TransPrune(keep=8, alpha=2), "alpha must be a float in [0, 1]"),
        (lambda: vtprune.AdaptivePrune(keep=8, mass=0), "mass must be in (0, 1]"),
        (lambda: vtprune.AdaptivePrune(keep=8, min_keep=4, max_keep=2), "max_keep must be None or an int >= min_keep"),
        (lambda: vtprune.AdaptivePrune(keep=8, spatial=1.0), "spatial must be in [0, 1)"),
        (lambda: vtprune.AdaptivePrune(keep=8, outlier=0.5), "outlier must be None or a number >= 1"),
        (lambda: vtprune.PyramidDrop(keep=8, schedule="papers"), "schedule must be None (fit to keep), 'paper'"),
        (lambda: vtprune.SparseVLM(keep=8, schedule="paper"), "its paper's settings are retain=64, 128 or 192"),
        (lambda: vtprune.MustDropFilter(keep=8, schedule="paper"), "its paper's settings are global_threshold"),
        (lambda: vtprune.VisionZip(keep=64, contextual=1.5), "contextual must be a float in"),
        (lambda: vtprune.ToDRE(keep=8, threshold=2), "threshold must be a float in"),
        (lambda: vtprune.Pipeline([]), "non-empty list of pruner objects"),
        (lambda: vtprune.Pipeline([vtprune.VisionZip(keep=128), vtprune.FastV(keep=64)]), "merges tokens"),
        (lambda: vtprune.Pipeline([vtprune.FastV(keep=64), vtprune.DivPrune(keep=128)]), "must come first"),
    ],
)
def test_bad_options_are_refused_when_the_pruner_is_built(make, message):
    with pytest.raises((ValueError, TypeError)) as info:
        make()
    assert message in str(info.value)


def test_todre_stages_have_names_of_their_own():
    todre = vtprune.ToDRE(keep=8)
    names = [todre.name] + [p.name for p in todre.pruners]
    assert names == ["todre", "todre.diversity", "todre.relevance"]
    assert [type(p) for p in todre.pruners] == [ToDREDiversity, ToDRERelevance]


class _Norm(VisionPruner):
    """A pruner that only scores: the token norm."""

    name = "norm"

    def score(self, tokens):
        return tokens.features.norm(dim=-1)


def test_a_pruner_that_only_scores_keeps_the_top_k_in_original_order():
    features = torch.tensor([[1.0], [5.0], [3.0], [4.0], [0.5]])
    kept = _Norm(keep=3).select(VisionTokens(features=features, keep=3))
    assert kept.tolist() == [1, 2, 3]
    assert _Norm(keep=3).reduce(VisionTokens(features=features, keep=3)).kept.tolist() == [1, 2, 3]


def test_score_ties_go_to_the_lower_index():
    kept = _Norm(keep=2).select(VisionTokens(features=torch.ones(5, 1), keep=2))
    assert kept.tolist() == [0, 1]


def test_a_score_of_the_wrong_shape_or_none_at_all_is_reported():
    class Wrong(VisionPruner):
        name = "wrong"

        def score(self, tokens):
            return torch.zeros(2)

    class Nothing(VisionPruner):
        name = "nothing"

    tokens = VisionTokens(features=torch.ones(5, 1), keep=2)
    with pytest.raises(TypeError, match=r"score\(\) must return a \(5,\) tensor"):
        Wrong(keep=2).select(tokens)
    with pytest.raises(NotImplementedError, match=r"must define score\(\) or select\(\)"):
        Nothing(keep=2).select(tokens)


def test_fastv_and_pdrop_rank_by_the_last_tokens_attention_and_transprune_by_its_mix():
    attention = torch.tensor([0.1, 0.4, 0.2, 0.3])
    tokens = PromptTokens(keep=2, positions=torch.arange(4), attention=attention)
    assert vtprune.FastV(keep=2).select(tokens).tolist() == [1, 3]
    assert vtprune.PyramidDrop(keep=2).select(tokens).tolist() == [1, 3]
    ttv = torch.tensor([4.0, 0.0, 0.0, 0.0])
    iga = torch.tensor([0.0, 0.1, 0.6, 0.3])
    tokens = PromptTokens(keep=2, positions=torch.arange(4), transition=ttv, instruction_attention=iga)
    assert vtprune.TransPrune(keep=2, alpha=0.5).select(tokens).tolist() == [0, 2]
    assert vtprune.TransPrune(keep=2, use_iga=False).select(tokens).tolist() == [0, 1]  # ties: lower index


def test_cls_ranks_by_cls_attention_or_keeps_whole_rows():
    scores = torch.tensor([0.0, 0.1, 0.9, 0.8, 0.2, 0.3])  # a 3 x 2 grid: rows (0, 0.1), (0.9, 0.8), (0.2, 0.3)
    tokens = VisionTokens(features=torch.zeros(6, 1), keep=3, grid=(3, 2), cls_attention=scores)
    assert vtprune.CLSPrune(keep=3).select(tokens).tolist() == [2, 3, 5]
    assert vtprune.CLSPrune(keep=3, strategy="row").select(tokens).tolist() == [2, 3, 5]
    tokens.keep = 4
    assert vtprune.CLSPrune(keep=4, strategy="row").select(tokens).tolist() == [2, 3, 4, 5]


def test_adaptive_spatial_term_spreads_over_the_grid():
    attention = torch.zeros(36)
    attention[:18] = torch.arange(18, 0, -1).float()  # all the attention on the first 3 rows of a 6 x 6 grid
    pruner = vtprune.AdaptivePrune(keep=12, mass=1.0, spatial=0.5)  # 18 of 36 tokens hold it: half the cap
    tokens = PromptTokens(keep=12, positions=torch.arange(36), grid=(6, 6), instruction_attention=attention)
    kept = pruner.select(tokens)
    assert kept.numel() == 6
    assert bool(torch.isin(torch.tensor([0, 1, 2]), kept).all())  # the three best by attention
    assert int((kept // 6).max()) == 5  # and the spread picks reach the far side of the grid
    assert torch.equal(
        farthest_points(torch.tensor([[0.0], [1.0], [9.0]]), torch.tensor([True, False, False]), 1), torch.tensor([2])
    )


def test_mass_spread_measures_how_widely_the_mass_lies():
    assert mass_spread(torch.ones(40), 0.9) == 1.0  # 36 of 40 equal scores hold 90%
    focused = torch.zeros(40)
    focused[:4] = 1.0
    assert mass_spread(focused, 0.9) == 4 / 36
    assert mass_spread(-torch.ones(3), 0.5) == 1.0  # nothing positive: every entry is as good as another
    sink = torch.ones(40)
    sink[7] = 1000.0  # one sink: unclipped it holds 96% of the mass; clipped it is one token among many
    assert mass_spread(sink, 0.9) == 1 / 36
    assert mass_spread(sink, 0.9, outlier=10) == mass_spread(torch.ones(40).index_fill(0, torch.tensor([7]), 10.0), 0.9)
    assert mass_spread(sink, 0.9, outlier=10) > 0.8
    with pytest.raises(ValueError, match="empty"):
        mass_spread(torch.zeros(0), 0.9)


def test_adaptive_counts_follow_the_spread_at_every_cap():
    pruner = vtprune.AdaptivePrune(keep=8, mass=0.9, outlier=None)
    wide, narrow = torch.ones(100), torch.cat([torch.ones(30), torch.zeros(70)])
    assert pruner.count(wide, 20) == 20 and pruner.count(narrow, 20) == round(20 * 27 / 90)
    assert pruner.count(narrow, 100) == 30  # a cap holding every token still drops by the rule
    assert vtprune.AdaptivePrune(keep=8, min_keep=9).count(narrow, 20) == 9
    assert vtprune.AdaptivePrune(keep=8, max_keep=5).count(wide, 20) == 5
    sink = torch.ones(100).index_fill(0, torch.tensor([3]), 1e4)
    assert vtprune.AdaptivePrune(keep=8).count(sink, 20) >= 18  # clipped (outlier=10): still spread out
    assert vtprune.AdaptivePrune(keep=8, outlier=None).count(sink, 20) == 1  # the sink alone holds 99%


def test_options_are_checked():
    with pytest.raises(ValueError, match="contextual must be a float in"):
        vtprune.VisionZip(keep=64, contextual=1.5)
    with pytest.raises(ValueError, match="merges tokens after the kept ones; LLM-stage pruners after it are not"):
        vtprune.Pipeline([vtprune.VisionZip(keep=128), vtprune.FastV(keep=64)])


def _option_fields():
    for name in vtprune.available():
        cls = vtprune.registry.pruner_class(name)
        for field in dataclasses.fields(cls):
            if field.init:
                yield pytest.param(cls, field.name, id=f"{name}.{field.name}")


@pytest.mark.parametrize("cls, option", list(_option_fields()))
@pytest.mark.parametrize("wrong", [object(), "x"], ids=["object", "str"])
def test_every_option_of_every_pruner_is_type_checked_at_construction(cls, option, wrong):
    if option in ("strategy", "budget", "crop_budget", "backend") and wrong == "x":
        wrong = "no such choice"
    with pytest.raises((ValueError, TypeError), match=option):
        cls(**{option: wrong})


def test_a_malformed_schedule_is_refused_before_the_model_is_known():
    with pytest.raises(ValueError, match="schedule must be"):
        vtprune.PyramidDrop(keep=8, schedule=[(2, 64), (1, 32)])
    vtprune.PyramidDrop(keep=8, schedule=[(100, 64)])  # the layer range needs the model: checked by apply


def test_a_pipeline_of_two_names_keeps_twice_in_its_first_pruner():
    pipeline = vtprune.Pipeline.of_two("tome+divprune", 16)
    assert [(p.name, p.keep) for p in pipeline.pruners] == [("tome", 32), ("divprune", 16)]
    assert [p.keep for p in vtprune.Pipeline.of_two("divprune+fastv", 0.75).pruners] == [1.0, 0.75]
    with pytest.raises(ValueError, match="two registered pruner names joined by"):
        vtprune.Pipeline.of_two("tome", 16)
    with pytest.raises(ValueError, match="unknown"):
        vtprune.Pipeline.of_two("tome+nothing", 16)
