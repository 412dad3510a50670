"""vtprune's vLLM plugin on vLLM's CPU build (its own environment: README, "Serving with vLLM"): a
family served with a pruner gives the transformers path's output under ``vtprune.apply``, token for
token, from a prompt as short; pruning off is vLLM's own model; batched requests equal each alone;
bad options stop the engine."""

import os

import pytest

pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment (README: Serving with vLLM)")

from vllm_served import Served, images, request, serve, transformers_path  # noqa: E402

from vtprune.testing.checkpoints import (  # noqa: E402
    nest_vision_model_keys,
    save_tiny_llava_hf,
    save_tiny_llava_next_hf,
)

LLAVA = Served("llava", "LlavaForConditionalGeneration", ((336, 336),))
# Wide, tall and square pictures: 2x1, 1x2 and 2x2 crops, unpadded differently.
NEXT = Served("llava_next", "LlavaNextForConditionalGeneration", ((200, 120), (90, 160), (224, 224)))
FAMILIES = {"llava": (LLAVA, save_tiny_llava_hf), "llava_next": (NEXT, save_tiny_llava_next_hf)}

SERVED = {
    "llava": [
        {"pruner": "random", "keep": 64},
        {"pruner": "uniform", "keep": 64},
        {"pruner": "cls", "keep": 64},
        {"pruner": "cls", "keep": 0.25, "strategy": "row"},
        {"pruner": "divprune", "keep": 64},
        {"pruner": "visionzip", "keep": 64},
        {"pruner": "todre", "keep": 32},
    ],
    "llava_next": [
        {"pruner": "random", "keep": 48},
        {"pruner": "uniform", "keep": 48},
        {"pruner": "cls", "keep": 48},
        {"pruner": "cls", "keep": 48, "crop_budget": "global"},
        {"pruner": "divprune", "keep": 0.25},
        {"pruner": "divprune", "keep": 48, "crop_budget": "global"},
        {"pruner": "visionzip", "keep": 48},
        {"pruner": "todre", "keep": 32},
    ],
}
CASES = [(family, options) for family, served in SERVED.items() for options in served]


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family, a tiny checkpoint: heads=2 since vLLM's CPU attention needs a head size of 32 or
    more (64 / 2); the tower's weights named as on the Hub (vLLM 0.32 loads only those)."""
    out = {}
    for name, (_, save) in FAMILIES.items():
        out[name] = str(nest_vision_model_keys(save(tmp_path_factory.mktemp(name), heads=2)))
    return out


@pytest.fixture(scope="module")
def unpruned(checkpoints):
    """Per family, what vLLM serves for its test images with pruning off."""
    return {
        name: serve(checkpoints[name], None, [request(im) for im in images(family)])
        for name, (family, _) in FAMILIES.items()
    }


@pytest.mark.slow
@pytest.mark.parametrize("family, options", CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES])
def test_served_output_equals_the_transformers_path(checkpoints, unpruned, family, options):
    served_family = FAMILIES[family][0]
    pictures = images(served_family)
    served = serve(checkpoints[family], options, [request(im) for im in pictures])
    for image, (served_length, tokens) in zip(pictures, served):
        length, expected = transformers_path(served_family, checkpoints[family], options, image)
        assert served_length == length
        assert tokens == expected
    assert all(s[0] < u[0] for s, u in zip(served, unpruned[family]))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_off_is_vllms_own_model(checkpoints, unpruned, family):
    served_family = FAMILIES[family][0]
    expected = [transformers_path(served_family, checkpoints[family], None, im) for im in images(served_family)]
    assert unpruned[family] == expected


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_batched_requests_equal_each_alone(checkpoints, family):
    options = {"pruner": "visionzip", "keep": 40}
    pictures = images(FAMILIES[family][0], 3)
    several = serve(checkpoints[family], options, [request(im) for im in pictures])
    alone = [serve(checkpoints[family], options, [request(im)])[0] for im in pictures]
    assert several == alone
    assert len({tuple(tokens) for _, tokens in several}) > 1  # different images, different answers


@pytest.mark.slow
@pytest.mark.parametrize(
    "options, message",
    [
        ({"pruner": "nope", "keep": 64}, "unknown pruner 'nope'"),
        ({"pruner": "divprune", "keep": 0}, "keep must be >= 1"),
        ({"pruner": "divprune", "kep": 64}, "bad options for pruner 'divprune'"),
        ({"pruner": "fastv", "keep": 64}, "paged KV cache"),
        ({"pruner": "tome", "keep": 64}, "inside the vision tower"),
        ({"pruner": "cls", "keep": 64, "layers": [2]}, "only up to layer 1"),
    ],
)
def test_bad_options_stop_the_engine(checkpoints, options, message):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        serve(checkpoints["llava"], options, [request(images(LLAVA)[0])])


@pytest.mark.slow
def test_vllm_serve_flag_carries_the_options(checkpoints):
    """``vllm serve MODEL --hf-overrides '{"vtprune": {...}}'``: the server's own argument parser puts
    the options on the model's config, where the plugin reads them."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    from vtprune.serving.options import serving_pruner

    flag = '{"vtprune": {"pruner": "visionzip", "keep": 48, "contextual": 0.25}}'
    args = make_arg_parser(FlexibleArgumentParser()).parse_args(
        ["--model", checkpoints["llava"], "--hf-overrides", flag]
    )
    config = EngineArgs.from_cli_args(args).create_model_config()
    pruner = serving_pruner(config.hf_config)
    assert (pruner.name, pruner.keep, pruner.contextual) == ("visionzip", 48, 0.25)
