"""``python -m vtprune demo``: every pruner on a tiny random LLaVA, tokens kept and prefill time."""

from __future__ import annotations

import argparse
import sys

import torch

import vtprune
from vtprune.testing import batch_inputs, make_prompt, tiny_llava
from vtprune.timing import median_seconds


def demo(keep: int) -> None:
    model = tiny_llava(hidden=256, layers=4, heads=4, kv_heads=4, vision_hidden=64)
    inputs = batch_inputs(model, [make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11])])
    n_visual = int((inputs["input_ids"] == model.config.image_token_id).sum())
    print(f"tiny random LLaVA: {n_visual} visual tokens per image, prompt of {inputs['input_ids'].shape[1]} tokens")
    print(f"{'pruner':<10} {'kept':>6} {'tokens per decoder layer':<28} {'prefill ms':>10}")
    base = median_seconds(lambda: model(**inputs), repeats=3)
    print(f"{'(none)':<10} {n_visual:>6} {'':<28} {base * 1e3:>10.1f}")
    for name in vtprune.available():
        with vtprune.apply(model, name, keep=keep) as handle:
            seconds = median_seconds(lambda: model(**inputs), repeats=3)
            per_layer = ",".join(str(t) for t in handle.last.layer_tokens[0])
            print(f"{name:<10} {handle.last.kept_counts[0]:>6} {per_layer:<28} {seconds * 1e3:>10.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="vtprune", description=__doc__)
    sub = parser.add_subparsers(dest="command")
    d = sub.add_parser("demo", help="run every pruner on a tiny random LLaVA")
    d.add_argument("--keep", type=int, default=64, help="visual tokens kept per image (default 64)")
    args = parser.parse_args(argv)
    if args.command is None:
        args = parser.parse_args(["demo", *(argv or [])])
    if args.keep < 1:
        parser.error(f"--keep must be >= 1, got {args.keep}")
    torch.manual_seed(0)
    demo(args.keep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
