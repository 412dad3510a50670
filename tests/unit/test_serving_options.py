"""The vLLM plugin's option checks (``vtprune.serving.options``): they need no vLLM, so they run here
too; the engine-start tests in tests/serving/ check the same messages reach a vLLM user."""

from types import SimpleNamespace

import pytest

from vtprune.core.tokens import ModelInfo
from vtprune.serving.options import check_against, serving_pruner

INFO = ModelInfo(
    num_decoder_layers=4,
    num_tower_layers=3,
    tower_has_cls=True,
    tower_name="CLIPVisionModel (vLLM)",
    feature_layers=(1,),
)


def config(options=None, **others):
    return SimpleNamespace(**({"vtprune": options} if options is not None else {}), **others)


def test_no_options_means_no_pruning():
    assert serving_pruner(config()) is None


@pytest.mark.parametrize(
    "options, pruner, keep",
    [
        ({"pruner": "divprune", "keep": 64}, "divprune", 64),
        ({"pruner": "cls", "keep": 0.25, "strategy": "row"}, "cls", 0.25),
        ({"pruner": "visionzip", "keep": 32, "contextual": 0.25}, "visionzip", 32),
        ({"pruner": "random", "keep": 16}, "random", 16),
        ({"pruner": "uniform", "keep": 16}, "uniform", 16),
        ({"pruner": "todre", "keep": 32}, "todre.diversity", 32),  # its vision stage, with a warning
    ],
)
def test_vision_stage_pruners_are_served(options, pruner, keep):
    served = serving_pruner(config(options))
    assert (served.name, served.keep) == (pruner, keep)
    assert options["pruner"]  # the caller's dict is not consumed


def test_todre_says_its_late_gate_is_not_applied(caplog):
    with caplog.at_level("WARNING", logger="vtprune.serving.options"):
        serving_pruner(config({"pruner": "todre", "keep": 31}))  # options not asked for before: not cached
    assert "late-layer gate is not applied" in caplog.text


@pytest.mark.parametrize(
    "options, error, message",
    [
        ("divprune", TypeError, r'hf_overrides\["vtprune"\] must be a dict'),
        ({"keep": 64}, ValueError, r'needs "pruner": one of .*divprune'),
        ({"pruner": 3}, TypeError, "must be a pruner name"),
        ({"pruner": "nope"}, ValueError, "unknown pruner 'nope'; available:"),
        ({"pruner": "divprune", "keep": 1.5}, ValueError, r"keep must be in \(0, 1\]"),
        ({"pruner": "divprune", "kep": 64}, TypeError, "bad options for pruner 'divprune'.*it takes keep"),
        ({"pruner": "fastv", "keep": 64}, ValueError, "'fastv' pruner cannot run in vLLM: vLLM's paged KV cache"),
        ({"pruner": "pdrop", "keep": 64}, ValueError, "paged KV cache"),
        ({"pruner": "adaptive", "keep": 64}, ValueError, "paged KV cache"),
        ({"pruner": "transprune", "keep": 64}, ValueError, "paged KV cache"),
        ({"pruner": "mustdrop", "keep": 64}, ValueError, "cannot run in vLLM"),
        ({"pruner": "tome", "keep": 64}, ValueError, "inside the vision tower"),
        ({"pruner": "catp", "keep": 64}, ValueError, "cannot run in vLLM"),
        ({"pruner": "cdpruner", "keep": 64}, ValueError, "paired prompt text, which vLLM's image encoder does not see"),
        ({"pruner": "vflowopt", "keep": 64}, ValueError, "cannot run in vLLM"),
    ],
)
def test_bad_options_are_refused_with_a_message(options, error, message):
    with pytest.raises(error, match=message):
        serving_pruner(config(options))


def test_tower_layers_vllm_did_not_build_are_refused():
    pruner = serving_pruner(config({"pruner": "cls", "keep": 8, "layers": [2]}))
    with pytest.raises(ValueError, match=r"reads vision-tower layers \[2\].*only up to layer 1"):
        check_against(pruner, INFO, built_tower_layers=2)
    check_against(serving_pruner(config({"pruner": "cls", "keep": 8})), INFO, built_tower_layers=2)


def test_the_model_check_of_apply_runs():
    pruner = serving_pruner(config({"pruner": "cls", "keep": 8, "layers": [7]}))
    with pytest.raises(ValueError, match="outside the 3-layer vision encoder"):
        check_against(pruner, INFO, built_tower_layers=2)


def test_the_plugin_registers_its_classes_on_supported_vllm_only(monkeypatch):
    from types import ModuleType

    from vtprune.serving import plugin, runner

    registered, turned_on = {}, []
    monkeypatch.setattr(runner, "turn_on_position_recompute", lambda: turned_on.append(True))
    fake = ModuleType("vllm")
    fake.ModelRegistry = SimpleNamespace(register_model=lambda arch, cls: registered.__setitem__(arch, cls))
    monkeypatch.setitem(__import__("sys").modules, "vllm", fake)
    fake.__version__ = "0.32.1"
    plugin.register()
    assert registered == plugin.ARCHITECTURES
    assert all(isinstance(path, str) for path in registered.values())  # lazy: no vLLM model imported yet
    assert turned_on == [True]  # the runners then call recompute_mrope_positions for vtprune's Qwen models
    fake.__version__ = "0.40.0"
    with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM 0\.40\.0"):
        plugin.register()
