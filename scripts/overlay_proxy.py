"""Which patches each pruner keeps on the real-weights proxy: overlay sheet and where-it-looks table.

    python scripts/overlay_proxy.py --keep 32 --out docs/proxy/overlays.png --stats 100

The sheet has one row per image (easy-vqa test images, then scikit-image's astronaut and cat) and one
panel per pruner: the image as the tower sees it (224 px), dropped patches greyed out.

``--stats N`` measures on the first N easy-vqa test images, per pruner, where the kept tokens lie:
the share on the shape (foreground: a patch with at least a quarter of its pixels not near-white)
against the shape's share of all patches, and the mean norm of the kept tokens' tower features (the
projector's input) relative to the image's mean. It tests a suspicion: DINOv2 without registers puts
high-norm artifact tokens on empty background and its CLS token attends to them (Darcet et al., 2023),
so CLS-attention pruning would keep background.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None):
    import vtprune

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruners", nargs="+", default=list(vtprune.available()), choices=list(vtprune.available()))
    p.add_argument("--keep", type=int, default=32, help="visual tokens kept of 256")
    p.add_argument("--test-images", nargs="*", type=int, default=[0, 1, 2], help="easy-vqa test image ids")
    p.add_argument("--photos", nargs="*", default=["astronaut", "cat"], choices=["astronaut", "cat"])
    p.add_argument("--question", default=None, help="question asked (FastV depends on it)")
    p.add_argument("--out", type=Path, default=None, help="overlay sheet (PNG)")
    p.add_argument("--stats", type=int, default=0, help="easy-vqa test images for the where-it-looks table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--projector", default="default")
    args = p.parse_args(argv)
    if not 1 <= args.keep <= 256:
        p.error(f"--keep must lie in [1, 256], got {args.keep}")
    if args.out is None and args.stats == 0:
        p.error("nothing to do: give --out and/or --stats")
    return args


def where_it_looks(model, processor, pruners, keep: int, n: int, question: str) -> str:

    from vtprune.proxy import data
    from vtprune.proxy.features import tower_features
    from vtprune.proxy.overlay import foreground_patches, kept_tokens, model_view, patch_grid

    grid = patch_grid(processor)
    on_shape = {name: [] for name in pruners}
    norm_ratio = {name: [] for name in pruners}
    base_share, top_norm_on_shape = [], []
    for image_id in range(n):
        image = data.load_image("test", image_id)
        fg = foreground_patches(model_view(processor, image), grid)
        norms = tower_features(model, processor, [image])[0].norm(dim=-1)  # (256,)
        base_share.append(fg.float().mean().item())
        top = norms.topk(keep).indices
        top_norm_on_shape.append(fg[top].float().mean().item())
        for name in pruners:
            kept = kept_tokens(model, processor, image, name, question=question, keep=keep)
            on_shape[name].append(fg[kept].float().mean().item())
            norm_ratio[name].append((norms[kept].mean() / norms.mean()).item())

    def mean(values):  # in percent
        return 100 * sum(values) / len(values)

    lines = [
        (
            f"where {keep} kept tokens of 256 lie, mean over easy-vqa test images 0-{n - 1} "
            f"(the shape covers {mean(base_share):.1f}% of the patches)"
        ),
        "",
        "| pruner | kept tokens on the shape, % | kept feature norm / image mean |",
        "|---|---|---|",
    ]
    for name in pruners:
        ratio = sum(norm_ratio[name]) / len(norm_ratio[name])
        lines.append(f"| {name} | {mean(on_shape[name]):.1f} | {ratio:.2f} |")
    lines.append(f"| (the {keep} highest-norm tokens) | {mean(top_norm_on_shape):.1f} | - |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from vtprune.proxy import data, load_proxy
    from vtprune.proxy.overlay import DEFAULT_QUESTION, kept_tokens, overlay_row, panel_grid

    torch.set_num_threads(args.threads)
    question = args.question or DEFAULT_QUESTION
    model, processor = load_proxy(projector=args.projector)
    refused = {}
    for name in args.pruners:  # a keep the pruner's rule cannot reach (mustdrop_merge's windows)
        try:
            kept_tokens(model, processor, data.load_image("test", 0), name, question=question, keep=args.keep)
        except ValueError as error:
            refused[name] = str(error)
            print(f"{name} refused: {error}")
    args.pruners = [name for name in args.pruners if name not in refused]
    if args.out is not None:
        images = [(f"test {i}", data.load_image("test", i)) for i in args.test_images]
        images += [(name, data.load_photo(name)) for name in args.photos]
        rows = [
            overlay_row(model, processor, image, args.pruners, args.keep, question=question, title=label)
            for label, image in images
        ]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        panel_grid(rows).save(args.out)
        print(f"overlays: {args.out} ({len(rows)} images x {len(args.pruners)} pruners, keep {args.keep})")
    if args.stats:
        print(where_it_looks(model, processor, args.pruners, args.keep, args.stats, question))
    return 0


if __name__ == "__main__":
    sys.exit(main())
