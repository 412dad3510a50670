"""Build (or load) the real-weights proxy LLaVA and check it: tower vs onnxruntime, token counts.

    python scripts/build_proxy.py [--cache-dir DIR] [--rebuild]

Prints the build/load time, the tower's max abs difference from the ONNX backbone, and whether the
processor's ``<image>`` expansion matches what the model's ``get_image_features`` returns.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--cache-dir", type=Path, default=None, help="default: $VTPRUNE_CACHE/proxy or ~/.cache/vtprune/proxy"
    )
    p.add_argument("--rebuild", action="store_true", help="delete the cached model first")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from vtprune.proxy import available, missing
    from vtprune.proxy.load import CACHE_VERSION, PROJECTOR_FILE, default_cache_dir, load_proxy
    from vtprune.proxy.verify import verify_proxy

    if not available():
        print(f"missing: {', '.join(missing())}", file=sys.stderr)
        return 1
    target = (args.cache_dir or default_cache_dir()) / CACHE_VERSION
    if args.rebuild and target.exists():
        shutil.rmtree(target)
    start = time.perf_counter()
    model, processor = load_proxy(args.cache_dir, verbose=True)
    print(
        f"proxy ready in {time.perf_counter() - start:.1f} s (cache {target}); "
        f"projector: {PROJECTOR_FILE if PROJECTOR_FILE.is_file() else 'untrained'}"
    )
    facts = verify_proxy(model, processor)
    print(f"tower vs onnxruntime, max abs diff: {facts['tower_max_abs_diff']}")
    print(
        f"image tokens: processor {facts['processor_image_tokens']}, model {facts['model_image_tokens']} "
        f"(width {facts['feature_width']})"
    )
    ok = (
        facts["processor_image_tokens"] == facts["model_image_tokens"]
        and max(facts["tower_max_abs_diff"].values()) < 1e-4
    )
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
