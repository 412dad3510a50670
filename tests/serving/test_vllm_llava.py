"""vtprune's vLLM plugin on vLLM's CPU build (its own environment: README, "Serving with vLLM"):
LLaVA-1.5 served with a pruner gives the transformers path's output under ``vtprune.apply``, token
for token, from a prompt as short; pruning off is vLLM's own LLaVA; bad options stop the engine."""

import gc
import os

import pytest

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: ~2 s a start
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

vllm = pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment (README: Serving with vLLM)")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vtprune  # noqa: E402
from vtprune.testing.checkpoints import nest_vision_model_keys, save_tiny_llava_hf  # noqa: E402

PROMPT = "USER: <image>\nwhat is the shape ? ASSISTANT:"
NEW_TOKENS = 8
TOKENS_PER_IMAGE = 576


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # heads=2: vLLM's CPU attention needs a head size of at least 32 (64 / 2).
    directory = save_tiny_llava_hf(tmp_path_factory.mktemp("llava"), heads=2)
    return str(nest_vision_model_keys(directory))


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))


def images(n: int) -> list:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(n)]


def serve(checkpoint, options: dict | None, requests: list) -> list[tuple[int, list[int]]]:
    """(prompt tokens, greedy tokens) per request from a fresh engine with ``options`` as hf_overrides."""
    overrides = None if options is None else {"vtprune": dict(options)}
    llm = vllm.LLM(model=checkpoint, dtype="float32", max_model_len=1024, hf_overrides=overrides, seed=0)
    try:
        params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def request(image) -> dict:
    return {"prompt": PROMPT, "multi_modal_data": {"image": image}}


def transformers_path(checkpoint, options: dict | None, image) -> tuple[int, list[int]]:
    """(prompt tokens entering the LLM, greedy tokens) of transformers' LLaVA under ``vtprune.apply``."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    inputs = AutoProcessor.from_pretrained(checkpoint)(text=PROMPT, images=image, return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    if options is None:
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        return length, out[0, length:].tolist()
    options = dict(options)
    with vtprune.apply(model, options.pop("pruner"), **options) as handle:
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        entered = length - TOKENS_PER_IMAGE + handle.last.entering()[0].numel()
    return entered, out[0, length:].tolist()


SERVED = [
    {"pruner": "random", "keep": 64},
    {"pruner": "uniform", "keep": 64},
    {"pruner": "cls", "keep": 64},
    {"pruner": "cls", "keep": 0.25, "strategy": "row"},
    {"pruner": "divprune", "keep": 64},
    {"pruner": "visionzip", "keep": 64},
    {"pruner": "todre", "keep": 32},
]


@pytest.mark.slow
@pytest.mark.parametrize("options", SERVED, ids=lambda o: "-".join(str(v) for v in o.values()))
def test_served_output_equals_the_transformers_path(checkpoint, options):
    image = images(1)[0]
    [(served_length, served)] = serve(checkpoint, options, [request(image)])
    length, expected = transformers_path(checkpoint, options, image)
    assert served_length == length < 585
    assert served == expected


@pytest.mark.slow
def test_pruning_off_is_vllms_own_llava(checkpoint):
    image = images(1)[0]
    [(served_length, served)] = serve(checkpoint, None, [request(image)])
    assert (served_length, served) == transformers_path(checkpoint, None, image)
    assert served_length == 9 + TOKENS_PER_IMAGE


@pytest.mark.slow
def test_batched_requests_equal_each_alone(checkpoint):
    options = {"pruner": "visionzip", "keep": 48}
    several = serve(checkpoint, options, [request(im) for im in images(3)])
    alone = [serve(checkpoint, options, [request(im)])[0] for im in images(3)]
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
        ({"pruner": "cls", "keep": 64, "layers": [2]}, "only\n?.*up to layer 1"),
    ],
)
def test_bad_options_stop_the_engine(checkpoint, options, message):
    with pytest.raises((ValueError, TypeError, RuntimeError), match=message):
        serve(checkpoint, options, [request(images(1)[0])])
