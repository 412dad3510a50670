"""scripts/eval_proxy.py's pruner specs: ``name:key=value`` passes options to ``vtprune.apply``."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def script():
    path = Path(__file__).resolve().parents[2] / "scripts" / "eval_proxy.py"
    spec = importlib.util.spec_from_file_location("script_eval_proxy", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
