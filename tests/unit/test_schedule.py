"""Drop schedules of the LLM-stage pruners (vtprune.core.schedule): fitting a budget, explicit schedules, checks."""

import pytest

import vtprune
from vtprune.core.schedule import (
    DropPoint,
    budget_count,
    check_explicit,
    explicit,
    fit_average,
    layer_counts,
    mean_tokens,
    scaled_layers,
)


@pytest.mark.parametrize(
    "layers, n, average", [(32, 576, 64), (32, 576, 192), (30, 256, 16), (8, 576, 100), (30, 256, 64)]
)
def test_fit_average_meets_the_mean_within_rounding(layers, n, average):
    for depths, ratios in [((0.25, 0.5, 0.75), (0.5, 0.25, 0.125)), ((7 / 32, 9 / 32, 12 / 32), (0.875, 0.625, 0.125))]:
        points = fit_average(list(depths), list(ratios), layers, n, average)
        assert [p.layer for p in points] == sorted({p.layer for p in points}) and points[0].layer >= 1
        assert all(b.keep <= a.keep for a, b in zip(points, points[1:]))
        # one token more or less at one drop moves the mean by at most (layers after it) / layers
        assert abs(mean_tokens(points, layers, n) - average) <= 1.0


def test_fit_average_keeps_the_reference_schedules_when_the_budget_is_theirs():
    # PyramidDrop on LLaVA-1.5-7B: 576 -> 288 -> 144 -> 72 before layers 8, 16, 24 (mean 270).
    points = fit_average([0.25, 0.5, 0.75], [0.5, 0.25, 0.125], 32, 576, 270)
    assert points == [DropPoint(8, 288), DropPoint(16, 144), DropPoint(24, 72)]
    assert scaled_layers([7 / 32, 9 / 32, 12 / 32], 32) == [7, 9, 12]


def test_fit_average_moves_drops_earlier_for_small_budgets():
    points = fit_average([0.25, 0.5, 0.75], [0.5, 0.25, 0.125], 32, 576, 40)
    assert points[0].layer < 8 and abs(mean_tokens(points, 32, 576) - 40) <= 1.0
    # Below what a drop before layer 1 allows, the closest schedule: all tokens in layer 0, one after.
    assert layer_counts(fit_average([0.25, 0.5, 0.75], [0.5, 0.25, 0.125], 4, 576, 48), 4, 576) == [576, 1, 1, 1]


def test_explicit_schedule_counts():
    assert explicit([(2, 0.5), (5, 0.25)], 576) == [DropPoint(2, 288), DropPoint(5, 144)]
    assert explicit([(2, 64), (5, 100)], 50) == [DropPoint(2, 50), DropPoint(5, 50)]
    assert layer_counts(explicit([(2, 64), (5, 16)], 576), 8, 576) == [576, 576, 64, 64, 64, 16, 16, 16]


def test_float_keeps_round_alike_everywhere():
    for n in (9, 11, 575):
        expected = budget_count(0.5, n)
        assert vtprune.FastV(keep=0.5).keep_count(n) == expected == vtprune.DivPrune(keep=0.5).keep_count(n)
        assert explicit([(2, 0.5)], n) == [DropPoint(2, expected)]


@pytest.mark.parametrize(
    "schedule, message",
    [
        ([], "at least one drop point"),
        ([(2,)], "pairs"),
        ([(0, 64)], "int layers >= 1"),
        ([(8, 64)], "layers in [1, 7]"),
        ([(True, 64)], "int layers >= 1"),
        ([(2, "64")], "int keeps (tokens per image) or float keeps"),
        ([(2, 0)], "int keeps >= 1"),
        ([(2, 1.5)], "int keeps >= 1 or float keeps in (0, 1]"),
        ([(4, 64), (2, 32)], "strictly increasing layers"),
        ([(2, 64), (4, 0.5)], "keeps all ints or all floats"),
        ([(2, 32), (4, 64)], "non-increasing keeps"),
    ],
)
def test_check_explicit_refuses_malformed_schedules(schedule, message):
    with pytest.raises(ValueError, match="schedule must be") as info:
        check_explicit(schedule, 8)
    assert message in str(info.value)


def test_check_explicit_accepts_a_well_formed_schedule():
    check_explicit([(1, 200), (4, 60), (7, 20)], 8)
    check_explicit([[2, 0.5], [5, 0.25]], 8)


def test_budget_count_caps_ints_and_rounds_fractions_to_at_least_one():
    assert budget_count(64, 576) == 64 and budget_count(1000, 576) == 576
    assert budget_count(0.25, 576) == 144 and budget_count(0.001, 576) == 1 and budget_count(1.0, 7) == 7
