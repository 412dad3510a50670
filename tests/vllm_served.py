"""Serving tiny checkpoints with vLLM and running the same request through transformers under
``vtprune.apply``: what tests/serving/ compares. Imported only where vLLM is installed."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: ~2 s a start
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import vllm  # noqa: E402
from PIL import Image  # noqa: E402

import vtprune  # noqa: E402

PROMPT = "USER: <image>\nwhat is the shape ? ASSISTANT:"
NEW_TOKENS = 8


@dataclass(frozen=True)
class Served:
    """A family as the tests serve it: its transformers class and the image sizes its requests carry."""

    name: str
    model_class: str
    sizes: tuple[tuple[int, int], ...]  # (width, height) of the test images
    prompt: str = PROMPT


def images(family: Served, n: int | None = None) -> list:
    rng = np.random.default_rng(0)
    sizes = family.sizes if n is None else [family.sizes[i % len(family.sizes)] for i in range(n)]
    return [Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def request(image, prompt: str = PROMPT) -> dict:
    return {"prompt": prompt, "multi_modal_data": {"image": image}}


def serve(checkpoint: str, options: dict | None, requests: list) -> list[tuple[int, list[int]]]:
    """(prompt tokens, greedy tokens) per request from a fresh engine with ``options`` as hf_overrides."""
    overrides = None if options is None else {"vtprune": dict(options)}
    llm = vllm.LLM(model=checkpoint, dtype="float32", max_model_len=2048, hf_overrides=overrides, seed=0)
    try:
        params = vllm.SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        outputs = llm.generate(requests, params, use_tqdm=False)
        return [(len(o.prompt_token_ids), list(o.outputs[0].token_ids)) for o in outputs]
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()


def transformers_path(family: Served, checkpoint: str, options: dict | None, image) -> tuple[int, list[int]]:
    """(prompt tokens entering the LLM, greedy tokens) of the transformers model under ``vtprune.apply``."""
    import transformers

    model = getattr(transformers, family.model_class).from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    inputs = processor(text=family.prompt, images=image, return_tensors="pt")
    length = inputs["input_ids"].shape[1]
    if options is None:
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        return length, out[0, length:].tolist()
    options = dict(options)
    entered = []  # the sequence length of each language-model call: the prefill's first
    hook = model.model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: entered.append(kwargs["inputs_embeds"].shape[1]), with_kwargs=True
    )
    try:
        with vtprune.apply(model, options.pop("pruner"), **options):
            out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    finally:
        hook.remove()
    return entered[0], out[0, length:].tolist()
