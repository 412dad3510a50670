"""vtprune's vLLM plugin on Qwen2-VL and Qwen2.5-VL (vLLM's CPU build, its own environment): served with
a pruner, a batch of images gives the transformers path's output under ``vtprune.apply`` for each
image alone, from a prompt as short, with every kept token at its original M-RoPE position (the
first token's log-probability agrees too); pruning off is vLLM's own model."""

import os

import pytest

pytest.importorskip("vllm", reason="the vLLM tests run in the vLLM environment (README: Serving with vLLM)")

from vllm_served import Served, images, request, serve, transformers_path  # noqa: E402

from vtprune.testing.checkpoints import save_tiny_qwen2_vl_hf  # noqa: E402

PROMPT = "USER: <|vision_start|><|image_pad|><|vision_end|>what is the shape ? ASSISTANT:"
SIZES = ((196, 140), (112, 224), (168, 168))  # 35, 32 and 36 tokens after the 2x2 merger
QWEN2 = Served("qwen2_vl", "Qwen2VLForConditionalGeneration", SIZES, PROMPT)
QWEN25 = Served("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", SIZES, PROMPT)
FAMILIES = {"qwen2_vl": (QWEN2, "2"), "qwen2_5_vl": (QWEN25, "2.5")}

CASES = [
    ("qwen2_vl", {"pruner": "random", "keep": 8}),
    ("qwen2_vl", {"pruner": "uniform", "keep": 8}),
    ("qwen2_vl", {"pruner": "cls", "keep": 8}),
    ("qwen2_vl", {"pruner": "divprune", "keep": 0.25}),
    ("qwen2_vl", {"pruner": "visionzip", "keep": 10}),
    ("qwen2_vl", {"pruner": "todre", "keep": 8}),
    ("qwen2_5_vl", {"pruner": "cls", "keep": 8}),
    ("qwen2_5_vl", {"pruner": "divprune", "keep": 8}),
    ("qwen2_5_vl", {"pruner": "visionzip", "keep": 10}),
]


@pytest.fixture(scope="module", autouse=True)
def cache_root(tmp_path_factory):
    os.environ["VLLM_CACHE_ROOT"] = str(tmp_path_factory.mktemp("vllm-cache"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Per family, a tiny checkpoint with a head size of 32 (vLLM's CPU attention needs 32 or more)."""
    return {
        name: str(save_tiny_qwen2_vl_hf(tmp_path_factory.mktemp(name), version=version, hidden=128))
        for name, (_, version) in FAMILIES.items()
    }


def _requests(family: Served) -> list:
    return [request(im, family.prompt) for im in images(family)]


@pytest.mark.slow
@pytest.mark.parametrize("family, options", CASES, ids=[f"{f}-{'-'.join(map(str, o.values()))}" for f, o in CASES])
def test_served_output_equals_the_transformers_path(checkpoints, family, options):
    served_family = FAMILIES[family][0]
    served = serve(checkpoints[family], options, _requests(served_family))
    for image, (served_length, tokens) in zip(images(served_family), served):
        length, expected = transformers_path(served_family, checkpoints[family], options, image)
        assert served_length == length
        assert tokens == expected
    full = [len(PROMPT.split()) - 1 + (w // 28) * (h // 28) for w, h in SIZES]  # the unpruned prompts' lengths
    assert all(s[0] < f for s, f in zip(served, full))


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_pruning_off_is_vllms_own_model(checkpoints, family):
    served_family = FAMILIES[family][0]
    served = serve(checkpoints[family], None, _requests(served_family))
    assert served == [transformers_path(served_family, checkpoints[family], None, im) for im in images(served_family)]


@pytest.mark.slow
def test_videos_are_refused_with_pruning_on(checkpoints):
    import numpy as np
    from vllm.exceptions import VLLMValidationError

    video = {
        "prompt": PROMPT.replace("image_pad", "video_pad"),
        "multi_modal_data": {"video": np.zeros((4, 56, 56, 3), dtype=np.uint8)},
    }
    with pytest.raises(VLLMValidationError, match="At most 0 video"):
        serve(checkpoints["qwen2_vl"], {"pruner": "divprune", "keep": 8}, [video])
