"""Throughput and time to first token of vLLM serving LLaVA, unpruned and with vtprune's pruners.

Run in the vLLM environment (README: "Serving with vLLM"); the plugin prunes through
``hf_overrides={"vtprune": {"pruner": ..., "keep": ...}}``.

    python scripts/bench_vllm.py                    # a LLaVA-shaped random checkpoint, on the CPU
    python scripts/bench_vllm.py --pruners divprune visionzip --keeps 64 --requests 8
    python scripts/bench_vllm.py --model llava-hf/llava-1.5-7b-hf --dtype bfloat16 --requests 256 --max-tokens 64

For every row a fresh engine (in this process) serves ``--requests`` requests at once, each one
image (distinct random pictures, so no cache is hit) and the same short question, generating
``--max-tokens`` tokens (EOS ignored): requests/s is their count over the wall time. TTFT is the
median wall time of ``--ttft-requests`` requests sent one at a time with one new token: processing,
tower, projector, pruning and prefill. "prompt" is the prompt tokens vLLM schedules per request.

``--model llava-shaped`` (the default) saves a random checkpoint first: a CLIP-like tower (336 px,
patch 14: 576 patches) of ``--vision-hidden`` x ``--vision-layers``, a Llama decoder with hidden 1024,
8 layers, 16 heads (vtprune.testing.LLAVA_SHAPED_LLM) and a 70-word vocabulary, in fp32.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

PRUNERS = ["random", "uniform", "cls", "divprune", "visionzip", "todre"]
QUESTION = "USER: <image>\nwhat is the shape ? ASSISTANT:"


def llava_shaped_checkpoint(directory: str, vision_hidden: int, vision_layers: int) -> str:
    from vtprune.testing import LLAVA_SHAPED_LLM
    from vtprune.testing.checkpoints import nest_vision_model_keys, save_tiny_llava_hf

    sizes = {k: v for k, v in LLAVA_SHAPED_LLM.items() if k != "vocab"}  # the tokenizer's words
    save_tiny_llava_hf(
        directory, vision_hidden=vision_hidden, vision_layers=vision_layers, vision_heads=vision_hidden // 64, **sizes
    )
    return str(nest_vision_model_keys(directory))


def requests(n: int, seed: int) -> list[dict]:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    pictures = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(n)]
    return [{"prompt": QUESTION, "multi_modal_data": {"image": p}} for p in pictures]


def measure(args, model: str, options: dict | None) -> dict:
    import vllm

    overrides = None if options is None else {"vtprune": options}
    llm = vllm.LLM(
        model=model,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        hf_overrides=overrides,
        seed=0,
        limit_mm_per_prompt={"image": 1},
    )
    try:
        first = vllm.SamplingParams(max_tokens=1, temperature=0)
        llm.generate(requests(1, seed=1), first, use_tqdm=False)  # warm-up
        singles = []
        for r in requests(args.ttft_requests, seed=2):
            start = time.perf_counter()
            llm.generate([r], first, use_tqdm=False)
            singles.append(time.perf_counter() - start)
        batch = requests(args.requests, seed=3)
        params = vllm.SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(batch, params, use_tqdm=False)
        wall = time.perf_counter() - start
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return {
        "prompt": len(outputs[0].prompt_token_ids),
        "ttft_ms": 1000 * statistics.median(singles),
        "requests_s": args.requests / wall,
        "tokens_s": sum(len(o.outputs[0].token_ids) for o in outputs) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llava-shaped", help="a checkpoint directory or Hub id, or llava-shaped")
    parser.add_argument("--pruners", nargs="+", default=PRUNERS)
    parser.add_argument("--keeps", nargs="+", type=int, default=[64, 144])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--ttft-requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-model-len", type=int, default=2048)
    parser.add_argument("--vision-hidden", type=int, default=512)
    parser.add_argument("--vision-layers", type=int, default=12)
    args = parser.parse_args()

    import torch
    import vllm

    with tempfile.TemporaryDirectory() as scratch:
        os.environ.setdefault("VLLM_CACHE_ROOT", os.path.join(scratch, "cache"))
        model = args.model
        if model == "llava-shaped":
            model = llava_shaped_checkpoint(os.path.join(scratch, "model"), args.vision_hidden, args.vision_layers)
        rows = [("unpruned", "", measure(args, model, None))]
        for pruner in args.pruners:
            for keep in args.keeps:
                rows.append((pruner, keep, measure(args, model, {"pruner": pruner, "keep": keep})))

    print(
        f"\n{args.model}, {args.dtype}; vLLM {vllm.__version__}, torch {torch.__version__}; {platform.machine()}, "
        f"{os.cpu_count()} CPUs; {args.requests} requests x {args.max_tokens} tokens\n"
    )
    print("| pruner | keep | prompt tokens | TTFT (ms) | requests/s | output tokens/s | requests/s vs unpruned |")
    print("|---|---|---|---|---|---|---|")
    base = rows[0][2]["requests_s"]
    for pruner, keep, m in rows:
        print(
            f"| {pruner} | {keep} | {m['prompt']} | {m['ttft_ms']:.0f} | {m['requests_s']:.2f} | {m['tokens_s']:.1f} | "
            f"{m['requests_s'] / base:.2f}x |"
        )


if __name__ == "__main__":
    main()
