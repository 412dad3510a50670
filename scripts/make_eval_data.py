"""Write the data of vtprune's offline lmms-eval tasks (``eval/tasks/vtprune``) and, optionally, the
real-weights proxy as a model directory.

    python scripts/make_eval_data.py --out ~/vtprune-eval            # shapes + 1,000 easy-vqa questions
    python scripts/make_eval_data.py --out ~/vtprune-eval --proxy ~/vtprune-proxy
    export VTPRUNE_EVAL_DATA=~/vtprune-eval
    lmms-eval --model vtprune --model_args pretrained=~/vtprune-proxy,pruner=divprune,keep=32 \
        --tasks vtprune_easyvqa --include_path eval/tasks --batch_size 8 --output_path runs/

The easy-vqa questions are ``vtprune.proxy.data.subset("test", n, seed)``: with the defaults, the
1,000 questions ``vtprune.proxy.evaluate`` asks. ``--proxy DIR`` saves the proxy with its trained
projector (``vtprune.proxy.export_proxy``); both need the ``proxy`` extra.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_out = os.environ.get("VTPRUNE_EVAL_DATA")
    p.add_argument("--out", type=Path, default=default_out, required=default_out is None, help="data directory")
    p.add_argument("--shapes", type=int, default=200, help="drawn shape images (one yes/no and one choice each)")
    p.add_argument("--easyvqa", type=int, default=1000, help="easy-vqa test questions (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--proxy", type=Path, default=None, help="also export the proxy model to this directory")
    args = p.parse_args(argv)
    if args.shapes < 1 or args.easyvqa < 0:
        p.error("--shapes must be >= 1 and --easyvqa >= 0")
    from vtprune.evaluation.task_data import write_easyvqa, write_shapes

    for name, count in write_shapes(args.out, n_images=args.shapes, seed=args.seed).items():
        print(f"{args.out / name}: {count} questions")
    if args.easyvqa:
        print(f"{args.out / 'easyvqa.jsonl'}: {write_easyvqa(args.out, n=args.easyvqa, seed=args.seed)} questions")
    if args.proxy is not None:
        from vtprune.proxy import export_proxy

        print(f"proxy with its trained projector: {export_proxy(args.proxy)}")
    print(f"export VTPRUNE_EVAL_DATA={args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
