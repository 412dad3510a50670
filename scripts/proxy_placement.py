"""Which kept tokens the proxy needs to read an image: accuracy when the kept tokens are placed by hand.

    python scripts/proxy_placement.py --keep 16 --threads 2

On the shape and colour questions of the fixed 1,000-question test subset (``--n`` of them), every
image keeps ``--keep`` of its 256 tokens before the language model, drawn at random (seeded by the
image) from one region of the patch grid: the shape (``vtprune.proxy.overlay.foreground_patches``),
the shape and the ring of patches around it, the background, or a mix with a given share on the
shape. It separates *where* kept tokens lie from *how* a pruner ranks them: a pruner that keeps only
the object, which deep-layer attention favours, is judged against the same count placed elsewhere.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import ClassVar

REGIONS = ("shape", "shape+ring", "background", "anywhere")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keep", type=int, default=16, help="visual tokens kept of 256")
    p.add_argument("--mix", nargs="*", type=float, default=[0.3], help="shares of the kept tokens on the shape")
    p.add_argument("--n", type=int, default=None, help="shape and colour questions (default: all 249)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if not 1 <= args.keep <= 256:
        p.error(f"--keep must lie in [1, 256], got {args.keep}")
    if any(not 0 <= m <= 1 for m in args.mix):
        p.error(f"--mix shares must lie in [0, 1], got {args.mix}")
    if args.n is not None and args.n < 1:
        p.error("--n must be >= 1")
    return args


def ring(shape, grid: int):
    """(grid * grid,) bool: ``shape`` grown by one patch in the eight directions."""
    import torch.nn.functional as F

    mask = shape.view(1, 1, grid, grid).float()
    return F.max_pool2d(mask, 3, stride=1, padding=1).flatten() > 0


def draw(pool, k: int, generator):
    """Up to ``k`` indices of the True entries of ``pool``, at random."""
    import torch

    candidates = pool.nonzero().flatten()
    return candidates[torch.randperm(candidates.numel(), generator=generator)[:k]]


def placement(shape, grid: int, region: str | float, keep: int, seed: int):
    """Ascending indices of the kept tokens: ``keep`` from ``region``, or a share ``region`` of them
    from the shape and the rest from the background (as many as each has)."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    if isinstance(region, float):
        on = draw(shape, round(region * keep), generator)
        off = draw(~shape, keep - on.numel(), generator)
        return torch.cat([on, off]).sort().values
    pools = {"shape": shape, "shape+ring": ring(shape, grid), "background": ~shape, "anywhere": torch.ones_like(shape)}
    return draw(pools[region], keep, generator).sort().values


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import vtprune
    from vtprune.proxy import data, load_proxy
    from vtprune.proxy.evaluate import IMAGE_READING, accuracy, predict, question_kind
    from vtprune.proxy.overlay import foreground_patches, model_view, patch_grid
    from vtprune.pruners.base import VisionPruner

    @dataclass
    class Placed(VisionPruner):
        """Keeps the tokens ``chosen`` names (set before each question): an experiment, not a method."""

        chosen: torch.Tensor | None = None
        name: ClassVar[str] = "placed"

        def select(self, tokens):
            return self.chosen

    torch.set_num_threads(args.threads)
    model, processor = load_proxy()
    grid = patch_grid(processor)
    items = [q for q in data.subset("test", 1000, 0) if question_kind(q) in IMAGE_READING][: args.n]
    shapes = {}
    for q in items:
        if q.image_id not in shapes:
            shapes[q.image_id] = foreground_patches(model_view(processor, data.load_image("test", q.image_id)), grid)
    cover = sum(float(s.float().mean()) for s in shapes.values()) / len(shapes)
    print(f"{len(items)} shape and colour questions; the shape covers {100 * cover:.1f}% of the patches")
    print(f"\n| {args.keep} tokens kept from | on the shape, % | tokens kept (mean) | shape + colour, % |")
    print("|---|---|---|---|")
    for region in [*REGIONS, *args.mix]:
        pruner, predictions, on_shape, counts = Placed(keep=256), [], [], []
        with vtprune.apply(model, pruner):
            for q in items:
                shape = shapes[q.image_id]
                pruner.chosen = placement(shape, grid, region, args.keep, seed=q.image_id)
                on_shape.append(float(shape[pruner.chosen].float().mean()))
                counts.append(pruner.chosen.numel())
                predictions += predict(model, processor, [q], batch_size=1)
        label = f"{100 * region:.0f}% shape, the rest background" if isinstance(region, float) else region
        print(
            f"| {label} | {100 * sum(on_shape) / len(on_shape):.1f} | {sum(counts) / len(counts):.1f} "
            f"| {100 * accuracy(items, predictions):.1f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
