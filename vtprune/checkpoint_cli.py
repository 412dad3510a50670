"""``vtprune checkpoint {proxy,tiny} DIR``: write a local llava-hf checkpoint without the Hub.

    vtprune checkpoint proxy ~/vtprune-proxy   # real weights: DINOv2-S/14 + SmolLM2-135M (the proxy extra)
    vtprune checkpoint tiny ~/vtprune-tiny     # a tiny random LLaVA: any install, answers are noise

Either directory loads wherever a checkpoint is taken: ``examples/quickstart.py DIR``,
``LlavaForConditionalGeneration.from_pretrained(DIR)``, ``vtprune profile --model DIR`` and
lmms-eval's ``--model_args pretrained=DIR``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from vtprune.cli_parser import OneLineParser

KINDS = {
    "proxy": "the real-weights proxy LLaVA (DINOv2-S/14 + SmolLM2-135M, 256 visual tokens; needs the proxy extra)",
    "tiny": "a tiny random-weight LLaVA (576 visual tokens; for trying the plumbing, not the answers)",
}


def main(argv=None) -> int:
    p = OneLineParser(prog="vtprune checkpoint", description="Write a local llava-hf checkpoint, no download needed.")
    p.add_argument("kind", choices=list(KINDS), help="; ".join(f"{k}: {v}" for k, v in KINDS.items()))
    p.add_argument("directory", type=Path, help="where to save it (created; must not be a file)")
    args = p.parse_args(argv)
    if args.directory.exists() and not args.directory.is_dir():
        p.error(f"{args.directory} is a file, not a directory")
    if args.kind == "proxy":
        from vtprune import proxy

        if not proxy.available():
            p.error(f"the proxy needs the proxy extra: missing {', '.join(proxy.missing())} (see docs/install.md)")
        proxy.export_proxy(args.directory)
    else:
        from vtprune.testing import save_tiny_llava_hf

        save_tiny_llava_hf(args.directory)
    print(f"wrote {KINDS[args.kind].split(' (')[0]} to {args.directory}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
