"""Decoding under each pruner: prefill time, time per generated token and the KV cache's size.

Generates ``--tokens`` tokens greedily (``min_new_tokens`` = ``max_new_tokens``, so every run decodes
as many) from the LLaVA-shaped random CPU model of ``bench_prefill.py`` (CLIP-like tower, Llama
decoder with hidden 1024, 8 layers; a 576-token image in a 651-token prompt), unpruned and under each
pruner. Prefill: a ``generate()`` of one token; per token: (the time of a ``generate()`` of
``--tokens`` tokens - prefill) / (tokens - 1); KV cache: the bytes of every layer's keys and values
once generation ends (the decode stage's cache policies shrink them). Medians of ``--repeats`` runs,
after a warm-up.

    python scripts/bench_decode.py                           # 128 tokens, default pruners, keep 64
    python scripts/bench_decode.py --pruners pdrop mustdrop --keeps 64 128 --tokens 32
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import vtprune
from vtprune.pruners.base import keep_from_text
from vtprune.testing import LLAVA_SHAPED_LLM, batch_inputs, make_prompt, tiny_llava

DEFAULT_PRUNERS = ["divprune", "fastv", "pdrop", "pdrop+mustdrop.cache", "sparsevlm", "mustdrop"]


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def pruner_of(name: str, keep):
    """A registry name, or ``a+mustdrop.cache``: that pruner with MustDrop's output-aware cache after it."""
    if name.endswith("+mustdrop.cache"):
        return [vtprune.registry.pruner_class(name.split("+")[0])(keep=keep), vtprune.MustDropCache()]
    return vtprune.registry.pruner_class(name)(keep=keep)


def run(model, inputs, tokens: int, repeats: int) -> tuple[float, float, int]:
    """Median prefill seconds (a generate() of one token), median seconds per generated token after the
    first (a generate() of ``tokens`` minus that, over ``tokens - 1``), the KV cache's bytes at the end."""

    def generate(n: int):
        with torch.no_grad():
            start = time.perf_counter()
            out = model.generate(
                **inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, return_dict_in_generate=True
            )
            return time.perf_counter() - start, out

    generate(2)  # warm-up
    firsts, per_token, size = [], [], 0
    for _ in range(repeats):
        first, _ = generate(1)
        total, out = generate(tokens)
        firsts.append(first)
        per_token.append(max(total - first, 0.0) / (tokens - 1))
        size = cache_bytes(out.past_key_values)
    return statistics.median(firsts), statistics.median(per_token), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pruners", nargs="+", default=DEFAULT_PRUNERS)
    parser.add_argument("--keeps", type=keep_from_text, nargs="+", default=[64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    unknown = [n for n in args.pruners if n.split("+")[0] not in vtprune.available()]
    if unknown or any("+" in n and not n.endswith("+mustdrop.cache") for n in args.pruners):
        parser.error(f"pruners must be registry names or NAME+mustdrop.cache; available: {vtprune.available()}")
    if args.tokens < 2:
        parser.error(f"--tokens must be >= 2, got {args.tokens}")
    torch.set_num_threads(args.threads)

    model = tiny_llava(vision_hidden=512, vision_layers=12, vision_heads=8, **LLAVA_SHAPED_LLM)
    before, after = [1] + list(range(40, 74)), list(range(100, 140))
    inputs = batch_inputs(model, [make_prompt(model, before, after)])
    print(f"machine: {platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    length = inputs["input_ids"].shape[1]
    print(f"model: llava, Llama 8x1024, prompt {length} tokens (576 visual), {args.tokens} generated\n")
    print("| pruner | keep | visual entries per layer (mean, last step) | prefill ms | ms per token | KV cache MB |")
    print("|---|---|---|---|---|---|")
    prefill, per_token, size = run(model, inputs, args.tokens, args.repeats)
    print(f"| unpruned | | 576.0 | {prefill * 1e3:.0f} | {per_token * 1e3:.1f} | {size / 2**20:.1f} |")
    for name in args.pruners:
        for keep in args.keeps:
            with vtprune.apply(model, pruner_of(name, keep)) as handle:
                prefill, per_token, size = run(model, inputs, args.tokens, args.repeats)
                stats = handle.last
            held = stats.decode_tokens[0][-1] if stats.decode_tokens else stats.layer_tokens[0]
            mean = sum(held) / len(held)
            row = f"{mean:.1f} | {prefill * 1e3:.0f} | {per_token * 1e3:.1f} | {size / 2**20:.1f}"
            print(f"| {name} | {keep} | {row} |")


if __name__ == "__main__":
    main()
