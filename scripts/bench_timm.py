"""Images per second of a timm ViT unpruned and under the tower-stage pruners, as in the papers' speed tables.

    python scripts/bench_timm.py                                   # ViT-B/16 shape, random weights
    python scripts/bench_timm.py --model vit_small_patch16_224 --batch-size 16 --runs tome:r=8 pitome:keep=0.5

Each ``--runs`` entry is ``name:option=value,...`` (a registered tower pruner and its options; values
are Python literals). Random weights are enough for speed (no download). Each row is the median of
``--repeats`` timed batches after a warm-up, the pruned model (a copy) and the unpruned one run
alternately so both see the same machine; the interquartile range of the paired speed-ups says how
much of it is noise.
"""

from __future__ import annotations

import argparse
import ast
import copy
import platform
import statistics
import sys

import torch

import vtprune
from vtprune.timing import paired_seconds, speedup

# The papers' settings (ToMe's and Zero-TPrune's r, PiToMe's DeiT ratio, MustDrop's threshold) and keeps of a half and a
# quarter of the patches.
DEFAULT_RUNS = [
    "tome:r=8",
    "tome:r=13",
    "tome:r=16",
    "tome:keep=0.5",
    "tome:keep=0.25",
    "pitome:ratio=0.925",
    "pitome:keep=0.5",
    "pitome:keep=0.25",
    "mustdrop_merge:threshold=0.8",
    "mustdrop_merge:keep=0.5",
    "zerotprune:r=8",
    "zerotprune:keep=0.5",
    "zerotprune:keep=0.25",
]


def parse_run(text: str):
    """``name:option=value,...`` -> a tower pruner; a ValueError saying what is wrong."""
    name, _, rest = text.partition(":")
    towers = [n for n in vtprune.available() if vtprune.registry.pruner_class(n).stage == "tower"]
    if name not in towers:
        raise ValueError(f"{text!r}: {name!r} is not a tower-stage pruner; choose from {towers}")
    options = {}
    for item in filter(None, rest.split(",")):
        key, equals, value = item.partition("=")
        if not equals:
            raise ValueError(f"{text!r}: options are option=value, got {item!r}")
        try:
            options[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise ValueError(f"{text!r}: {value!r} is not a Python literal") from None
    return vtprune.registry.pruner_class(name)(**options), rest or "defaults"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="vit_base_patch16_224", help="a timm VisionTransformer name")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="name:option=value,... (default: the papers')")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.repeats < 1:
        p.error("--batch-size and --repeats must be >= 1")
    try:
        runs = [parse_run(text) for text in args.runs]
    except (ValueError, TypeError) as error:
        p.error(f"--runs: {error}")
    import timm

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False).eval()
    images = torch.randn(args.batch_size, 3, *model.patch_embed.img_size)
    print(
        f"{args.model}, batch {args.batch_size}, {platform.machine()}, {args.threads} threads, "
        f"torch {torch.__version__}"
    )
    print("| pruner | options | patch tokens leaving the tower | images/s | unpruned images/s | speed-up (IQR) |")
    print("|---|---|---|---|---|---|")
    for pruner, label in runs:
        pruned = copy.deepcopy(model)  # two models, so neither apply() nor remove() is timed
        handle = vtprune.apply(pruned, pruner)
        timed = (lambda: model(images), lambda: pruned(images))  # noqa: B023 (run in this iteration only)
        unpruned, seconds = paired_seconds(*timed, repeats=args.repeats)
        ratio = speedup(unpruned, seconds)
        rate = args.batch_size / statistics.median(seconds)
        base = args.batch_size / statistics.median(unpruned)
        print(
            f"| `{pruner.name}` | {label} | {handle.last.token_counts[0]} | {rate:.1f} | {base:.1f} | "
            f"{ratio.median:.2f}x ({ratio.low:.2f}-{ratio.high:.2f}) |"
        )
        handle.remove()
    return 0


if __name__ == "__main__":
    sys.exit(main())
