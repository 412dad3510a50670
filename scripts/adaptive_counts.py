"""How much ``adaptive`` adapts on real weights: the per-question visual-token counts on the proxy.

    python scripts/adaptive_counts.py --keeps 16 32 64 --plot docs/proxy/adaptive_counts.png

On the shape and colour questions of the fixed 1,000-question test subset (``--n`` of them), runs
``adaptive`` at each keep and records, per question, the visual tokens entering every decoder layer.
The table gives the spread over questions of their mean per layer (which ``keep`` caps: the schedule's
caps average ``keep`` over the layers and a question keeps at most the cap at every drop) and of the
count kept at each drop; the plot is the histogram of the per-question means, one panel per keep.
A rule that did not adapt would put every question at the same count.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--keeps", nargs="+", type=int, default=[16, 32, 64], help="adaptive's keep (of 256)")
    p.add_argument("--n", type=int, default=None, help="shape and colour questions (default: all 249)")
    p.add_argument("--plot", type=Path, default=None, help="histogram of the per-question means (PNG)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if any(not 1 <= k <= 256 for k in args.keeps):
        p.error(f"--keeps must lie in [1, 256], got {args.keeps}")
    if args.n is not None and args.n < 1:
        p.error("--n must be >= 1")
    return args


def drop_layers(rows: list[list[int]]) -> list[int]:
    """The layers where any question's count changes: the drop points (a question may keep at one
    drop all the tokens it had, so one question's changes alone could miss a drop)."""
    return sorted({i for row in rows for i in range(1, len(row)) if row[i] != row[i - 1]})


def spread(values) -> str:
    """``min / 10th percentile / median / 90th / max`` of ``values``."""
    import torch

    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.0, 0.1, 0.5, 0.9, 1.0], dtype=torch.float64))
    return " / ".join(f"{v:.1f}" for v in q.tolist())


def plot(means: dict[int, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(means), figsize=(4.2 * len(means), 3.4), dpi=120, squeeze=False)
    for ax, (keep, values) in zip(axes[0], means.items()):
        ax.hist(values, bins=30, color="tab:blue")
        ax.axvline(keep, color="black", linestyle="--", label=f"keep {keep} (the caps' mean)")
        ax.set_xlabel("visual tokens per decoder layer (mean over layers)")
        ax.set_title(f"adaptive, keep {keep}")
        ax.legend(loc="upper left", fontsize=8)
    axes[0][0].set_ylabel("questions")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    import vtprune
    from vtprune.proxy import data, load_proxy
    from vtprune.proxy.evaluate import IMAGE_READING, accuracy, predict, question_kind

    torch.set_num_threads(args.threads)
    model, processor = load_proxy()
    items = [q for q in data.subset("test", 1000, 0) if question_kind(q) in IMAGE_READING][: args.n]
    print(f"{len(items)} shape and colour questions; unpruned: 256 visual tokens in every layer\n")
    quantiles = "min / p10 / median / p90 / max"
    print(f"| keep | shape + colour, % | per-question mean per layer: {quantiles} | kept at each drop: {quantiles} |")
    print("|---|---|---|---|")
    means = {}
    for keep in args.keeps:
        rows = []
        with vtprune.apply(model, "adaptive", keep=keep):
            predictions = predict(model, processor, items, batch_size=8, layer_tokens=rows)
        means[keep] = [sum(row) / len(row) for row in rows]
        per_drop = "; ".join(f"layer {i}: {spread([row[i] for row in rows])}" for i in drop_layers(rows)) or "-"
        score, mean = 100 * accuracy(items, predictions), sum(means[keep]) / len(rows)
        print(f"| {keep} | {score:.1f} | {spread(means[keep])} (mean {mean:.1f}) | {per_drop} |", flush=True)
    if args.plot is not None:
        plot(means, args.plot)
        print(f"\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
