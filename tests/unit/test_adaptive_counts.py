"""scripts/adaptive_counts.py: the drop points and the spread it reports."""

from __future__ import annotations

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("adaptive_counts")


def test_drop_layers_are_every_layer_where_any_question_changes(script):
    # the second question keeps all it had at layer 3's drop: the first question's change still marks it
    rows = [[256, 20, 20, 9, 9], [256, 18, 18, 18, 18]]
    assert script.drop_layers(rows) == [1, 3]
    assert script.drop_layers([[256, 256, 256]]) == []


def test_spread_gives_min_deciles_median_and_max(script):
    assert script.spread(list(range(11))) == "0.0 / 1.0 / 5.0 / 9.0 / 10.0"
    assert script.spread([7]) == "7.0 / 7.0 / 7.0 / 7.0 / 7.0"
