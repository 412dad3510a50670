"""Images per second of a timm ViT unpruned and under ToMe, as in the paper's speed tables.

    python scripts/bench_timm.py                                   # ViT-B/16 shape, random weights
    python scripts/bench_timm.py --model vit_small_patch16_224 --batch-size 16 --rs 8 13 --keeps 0.5

Random weights are enough for speed (no download). Each row is the median of ``--repeats`` timed
batches after a warm-up, ToMe (on a copy of the model) and unpruned run alternately so both see the
same machine; the
interquartile range of the paired speed-ups says how much of it is noise.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import sys

import torch

import vtprune
from vtprune.pruners.base import keep_from_text
from vtprune.timing import paired_seconds, speedup


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="a timm VisionTransformer name")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--rs", type=int, nargs="*", default=[8, 13, 16], help="ToMe's r (tokens merged per block)")
    p.add_argument("--keeps", nargs="*", default=["0.5", "0.25"], help="patch tokens leaving the tower")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        p.error("--batch-size and --repeats must be >= 1")
    try:
        keeps = [keep_from_text(k) for k in args.keeps]
    except ValueError as error:
        p.error(f"--keeps: {error}")
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
    print(
        f"{args.model}, batch {args.batch_size}, {platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print("| ToMe | patch tokens leaving the tower | images/s | unpruned images/s | speed-up (IQR) |")
    print("|---|---|---|---|---|")
    configs = [vtprune.ToMe(r=r) for r in args.rs] + [vtprune.ToMe(keep=k) for k in keeps]
    for config in configs:
        pruned = copy.deepcopy(model)  # two models, so neither apply() nor remove() is timed
        handle = vtprune.apply(pruned, config)
        runs = (lambda: model(images), lambda: pruned(images))  # noqa: B023 (run in this iteration only)
        unpruned, tome = paired_seconds(*runs, repeats=args.repeats)
        ratio = speedup(unpruned, tome)
        label = f"r={config.r}" if config.r is not None else f"keep={config.keep}"
        rate = args.batch_size / statistics.median(tome)
        base = args.batch_size / statistics.median(unpruned)
        print(
            f"| {label} | {handle.last.token_counts[0]} | {rate:.1f} | {base:.1f} | "
            f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f}) |"
        )
        handle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
