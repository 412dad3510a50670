"""scripts/eval_proxy.py's pruner specs: ``name:key=value`` passes options to ``vtprune.apply``."""

from __future__ import annotations

import re

import pytest
from helpers import load_script


@pytest.fixture(scope="module")
def script():
    return load_script("eval_proxy")


def test_options_parse_as_json_where_they_parse(script):
    assert script.options("fastv") == {}
    assert script.options("vflowopt:settings=docs/proxy/v.json") == {"settings": "docs/proxy/v.json"}
    assert script.options("fastv:layer=3:ratio=0.5") == {"layer": 3, "ratio": 0.5}


@pytest.mark.parametrize(
    "spec, message",
    [("fastv:layer", "written name:key=value"), ("fastv:=3", "written name:key=value"),
     ("tome+divprune:layer=2", "not an a\\+b Pipeline"), ("nosuch:layer=2", "unknown \\['nosuch'\\]")],
)  # fmt: skip
def test_bad_specs_are_refused_before_anything_runs(script, capsys, spec, message):
    with pytest.raises(SystemExit):
        script.parse_args(["--pruners", spec, "--results", "unused.json"])
    assert re.search(message, capsys.readouterr().err)


def test_keep_for_mean_takes_keep_equal_to_the_target_when_it_gives_that_mean(script):
    probed = []
    assert script.keep_for_mean(lambda k: probed.append(k) or float(k), 16) == (16, 16.0)
    assert probed == [16]  # one probe: a pruner whose keep is its mean needs no search


def test_keep_for_mean_searches_for_the_nearest_mean(script):
    def fastv(k):  # FastV at layer 2 of 30 on 256 tokens: two full layers, then k tokens
        return (2 * 256 + 28 * k) / 30

    keep, mean = script.keep_for_mean(fastv, 64)
    assert keep == 50 and abs(mean - 63.73) < 0.01
    assert all(abs(fastv(k) - 64) >= abs(mean - 64) for k in range(1, 257))
    assert script.keep_for_mean(fastv, 16) == (1, fastv(1))  # unreachable: the least mean, shown as "-"
    assert script.keep_for_mean(lambda k: None if k < 40 else float(k), 16) == (40, 40.0)  # refused below 40
    assert script.keep_for_mean(lambda k: None, 16) is None


def test_equal_mean_table_shows_keep_and_mean_and_refuses_far_means(script):
    runs = {
        "unpruned": {"by_kind": {"shape": 1.0}, "mean_tokens": 256.0},
        "a@16": {"by_kind": {"shape": 0.5}, "mean_tokens": 16.0},
        "b@1": {"by_kind": {"shape": 0.25}, "mean_tokens": 18.0},
        "c@20": {"by_kind": {"shape": 0.75}, "mean_tokens": 17.2},
    }
    results = {
        "runs": runs,
        "kind_counts": {"shape": 4},
        "equal_mean": {"a": {"16": 16}, "b": {"16": 1}, "c": {"16": 20}},
    }
    table = script.equal_mean_table(results, ["a", "b", "c", "d"], [16.0], ("shape",), "shape")
    assert "| a | 50.0 (50%) · keep 16 · 16.0 |" in table
    assert "| b | - (least 18.0) |" in table  # 12.5% above the target
    assert "| c | 75.0 (75%) · keep 20 · 17.2 |" in table  # 7.5% above: within 10%
    assert "| d | - |" in table
