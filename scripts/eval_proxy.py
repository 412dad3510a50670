"""Accuracy vs. kept visual tokens on the real-weights proxy, for every pruner: table, plot, JSON.

    python scripts/eval_proxy.py --threads 2 --results docs/proxy/accuracy.json --plot docs/proxy/accuracy.png

Runs ``vtprune.proxy.evaluate`` (the fixed 1,000-question easy-vqa test subset, one full forward per
question) unpruned and under ``vtprune.apply(model, pruner, keep=k)`` for every pruner and keep. Each
result is written to ``--results`` as soon as it is measured and found there on the next run, so an
interrupted sweep resumes (results made with another question subset or projector file are refused);
``--plot-only`` redraws the table and plot from that file. A pruner written ``a+b`` is a Pipeline in
which ``a`` keeps twice ``b``'s keep (``tome+divprune`` at 16: ToMe leaves 32 tokens, DivPrune keeps 16
of them), so its tokens entering the language model compare with ``b`` alone at the same keep. A
pruner written ``name:option=value`` (several joined by ``:``; a value read as JSON where it parses)
passes options to ``vtprune.apply``, e.g. ``vflowopt:settings=docs/proxy/vflowopt-16.json`` runs
VFlowOpt with settings ``vtprune calibrate`` wrote; the whole spec names the row.

Every run records ``mean_tokens``: the visual tokens per decoder layer, the mean over layers and
questions (``--means N`` adds it to runs measured before, from their first N questions: exact for
pruners whose counts do not depend on the input). ``keep`` means different budgets to different
pruners (FastV counts the tokens after its drop layer, multi-drop pruners the mean per layer), so
``--equal-mean 16 32 64`` compares them at the same mean instead: for every pruner and target it picks
the keep whose mean on the first ``--probe`` questions is nearest the target (searching when keep=target
misses it by more than 1%), runs it, and prints one table whose cells show the accuracy and the mean
measured over all questions; a pruner that cannot come within 10% of a target gets "-".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import sys
import time
from pathlib import Path

UNPRUNED = "unpruned"


def parse_args(argv=None):
    import vtprune

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pruners", nargs="+", default=list(vtprune.available()), help="names, or a+b for a Pipeline")
    p.add_argument("--keeps", nargs="+", type=int, default=[8, 16, 32, 64], help="visual tokens kept of 256")
    p.add_argument("--n", type=int, default=1000, help="test questions (the fixed seeded subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of the question subset")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--projector", default="default", help="projector file (default: the packaged one)")
    p.add_argument("--results", type=Path, required=True, help="JSON file: read to resume, written after each run")
    p.add_argument("--plot", type=Path, default=None, help="write accuracy vs. kept tokens here (PNG)")
    p.add_argument("--plot-only", action="store_true", help="only print the table and draw the plot")
    p.add_argument(
        "--equal-mean",
        nargs="+",
        type=float,
        default=None,
        metavar="M",
        help="compare at these mean visual tokens per decoder layer, not at equal keep",
    )
    p.add_argument("--probe", type=int, default=16, help="questions a keep is probed on for --equal-mean")
    p.add_argument(
        "--means",
        type=int,
        default=None,
        metavar="N",
        help="add the mean tokens per layer to stored runs that lack it, measured on N questions",
    )
    args = p.parse_args(argv)  # fmt: skip
    specs = [name.split(":")[0] for name in args.pruners]
    unknown = [part for name in specs for part in name.split("+") if part not in vtprune.available()]
    if unknown:
        p.error(f"--pruners: unknown {unknown}; choose from {vtprune.available()} or join two with +")
    for name in args.pruners:
        try:
            options(name)
        except ValueError as error:
            p.error(f"--pruners: {error}")
    if any(k < 1 or k > 256 for k in args.keeps):
        p.error(f"--keeps must lie in [1, 256], got {args.keeps}")
    if args.threads < 1 or args.batch_size < 1:
        p.error("--threads and --batch-size must be >= 1")
    if args.equal_mean is not None and any(not 1 <= m <= 256 for m in args.equal_mean):
        p.error(f"--equal-mean targets must lie in [1, 256], got {args.equal_mean}")
    if args.probe < 1 or (args.means is not None and args.means < 1):
        p.error("--probe and --means must be >= 1")
    return args


def options(spec: str) -> dict:
    """The options of a pruner spec ``name:key=value:...`` (values parsed as JSON where they parse)."""
    if ":" in spec and "+" in spec:
        raise ValueError(f"{spec!r}: options are for one pruner, not an a+b Pipeline")
    out = {}
    for part in spec.split(":")[1:]:
        name, sep, text = part.partition("=")
        if not sep or not name:
            raise ValueError(f"{spec!r}: options are written name:key=value, got {part!r}")
        try:
            out[name] = json.loads(text)
        except json.JSONDecodeError:
            out[name] = text
    return out


def pruned(model, pruner: str, keep: int):
    """``vtprune.apply`` of ``pruner`` (a name, ``name:key=value`` with options, or ``a+b``: a Pipeline
    where ``a`` keeps twice ``keep``)."""
    import vtprune

    if "+" not in pruner:
        return vtprune.apply(model, pruner.split(":")[0], keep=keep, **options(pruner))
    return vtprune.apply(model, vtprune.Pipeline.of_two(pruner, keep))


def key(pruner: str, keep: int | None) -> str:
    return UNPRUNED if pruner == UNPRUNED else f"{pruner}@{keep}"


def projector_digest(projector: str) -> str:
    """sha256 of the projector file, so results measured with another projector are never mixed in."""
    import hashlib

    from vtprune.proxy.load import PROJECTOR_FILE

    path = PROJECTOR_FILE if projector == "default" else Path(projector)
    if not path.is_file():
        raise SystemExit(f"projector file not found: {path}")
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def load_results(path: Path, args) -> dict:
    setup = {"n": args.n, "seed": args.seed, "projector_sha256": projector_digest(args.projector)}
    if not path.is_file():
        return {"setup": setup, "runs": {}}
    results = json.loads(path.read_text())
    if results.get("setup") != setup:
        raise SystemExit(f"{path} was measured with {results.get('setup')}, not {setup}: use another --results file")
    return results


def mean_note(run: dict) -> str:
    """`` · 16.3`` (the run's mean visual tokens per layer), or nothing for runs measured before."""
    return f" · {run['mean_tokens']:.1f}" if "mean_tokens" in run else ""


def markdown_table(results: dict, pruners, keeps) -> str:
    runs = results["runs"]

    def cell(name):
        run = runs.get(name)
        return "-" if run is None else f"{100 * run['accuracy']:.1f}{mean_note(run)}"

    lines = [
        "| pruner | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
        f"| {UNPRUNED} (256) | " + " | ".join(cell(UNPRUNED) for _ in keeps) + " |",
    ]
    lines += [f"| {p} | " + " | ".join(cell(key(p, k)) for k in keeps) + " |" for p in pruners]
    return "\n".join(lines)


def kind_table(results: dict, pruners, keeps) -> str:
    """Accuracy per kind of question (``accuracy_by_kind``) of every run that has it, one row per run."""
    runs = results["runs"]
    names = [n for n in [UNPRUNED] + [key(p, k) for p in pruners for k in keeps] if "by_kind" in runs.get(n, {})]
    if not names:
        return ""
    kinds = list(dict.fromkeys(kind for n in names for kind in runs[n]["by_kind"]))
    lines = ["| run | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for n in names:
        by_kind = runs[n]["by_kind"]
        lines.append(f"| {n} | " + " | ".join(f"{100 * by_kind[k]:.1f}" if k in by_kind else "-" for k in kinds) + " |")
    return "\n".join(lines)


def pooled_table(results: dict, pruners, keeps, kinds, title: str) -> str:
    """Accuracy over ``kinds`` together for every pruner and keep, and as a share of unpruned."""
    from vtprune.proxy.evaluate import pooled

    runs, counts = results["runs"], results.get("kind_counts")
    if not counts or "by_kind" not in runs.get(UNPRUNED, {}):
        return ""
    base = pooled(runs[UNPRUNED]["by_kind"], counts, kinds)
    if not base:
        return ""  # no question of these kinds in the subset

    def cell(name):
        run = runs.get(name, {})
        if "by_kind" not in run:
            return "-"
        value = pooled(run["by_kind"], counts, kinds)
        return "-" if value is None else f"{100 * value:.1f} ({100 * value / base:.0f}%){mean_note(run)}"

    n = sum(counts.get(k, 0) for k in kinds)
    lines = [
        f"| {title} ({n} questions) | " + " | ".join(f"keep {k}" for k in keeps) + " |",
        "|---|" + "---|" * len(keeps),
        f"| {UNPRUNED} (256) | " + " | ".join(f"{100 * base:.1f}" for _ in keeps) + " |",
    ]
    lines += [f"| {p} | " + " | ".join(cell(key(p, k)) for k in keeps) + " |" for p in pruners]
    return "\n".join(lines)


def plot(results: dict, pruners, keeps, path: Path) -> None:
    """Accuracy on the questions that need the image (shape + colour) vs. kept tokens, when the runs
    have it by kind; otherwise accuracy on all questions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vtprune.proxy.evaluate import IMAGE_READING, pooled

    runs, counts = results["runs"], results.get("kind_counts")
    by_kind = bool(counts) and "by_kind" in runs.get(UNPRUNED, {})
    by_kind = by_kind and bool(pooled(runs[UNPRUNED]["by_kind"], counts, IMAGE_READING))

    def value(run):
        if by_kind:
            return None if "by_kind" not in run else pooled(run["by_kind"], counts, IMAGE_READING)
        return run["accuracy"]

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    # x: the run's mean visual tokens per decoder layer, so pruners whose keep means other budgets
    # (FastV's tokens after its drop layer) stand where their cost is; keep for runs without it.
    every_mean = all("mean_tokens" in runs[key(p, k)] for p in pruners for k in keeps if key(p, k) in runs)
    for name in pruners:
        points = [(runs[key(name, k)], k) for k in keeps if key(name, k) in runs]
        points = [(run["mean_tokens"] if every_mean else k, value(run)) for run, k in points]
        points = [(x, v) for x, v in points if v is not None]
        if points:
            ax.plot([x for x, _ in points], [100 * v for _, v in points], marker="o", label=name)
    if UNPRUNED in runs:
        ax.axhline(100 * value(runs[UNPRUNED]), color="black", linestyle="--", label="unpruned (256)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(keeps, [str(k) for k in keeps])
    if every_mean:
        ax.set_xlabel("visual tokens per decoder layer (mean over layers and questions), of 256")
    else:
        ax.set_xlabel("keep: visual tokens of 256 (multi-drop pruners: mean per decoder layer)")
    n = sum(counts.get(k, 0) for k in IMAGE_READING) if by_kind else results["setup"]["n"]
    what = "shape + colour questions" if by_kind else "easy-vqa test questions"
    ax.set_ylabel(f"accuracy, % ({n} {what})")
    ax.set_title("Proxy LLaVA (DINOv2-S/14 + SmolLM2-135M)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def run_once(model, processor, items, pruner: str, keep: int | None, batch_size: int) -> dict:
    """Predictions of ``items`` under ``pruner`` at ``keep`` (UNPRUNED: none): accuracy, by kind,
    seconds and the mean visual tokens per layer. ValueError when the pruner refuses the keep."""
    from vtprune.proxy.evaluate import accuracy, accuracy_by_kind, mean_tokens, predict

    start, layer_tokens = time.perf_counter(), []
    context = contextlib.nullcontext() if pruner == UNPRUNED else pruned(model, pruner, keep)
    with context:
        predictions = predict(model, processor, items, batch_size=batch_size, layer_tokens=layer_tokens)
    return {
        "accuracy": accuracy(items, predictions),
        "by_kind": accuracy_by_kind(items, predictions),
        "seconds": round(time.perf_counter() - start, 1),
        "mean_tokens": round(mean_tokens(layer_tokens), 2),
    }


def probed_mean(model, processor, items, pruner: str, keep: int | None, batch_size: int) -> float | None:
    """The mean visual tokens per layer of ``pruner`` at ``keep`` on ``items`` (None: keep refused)."""
    from vtprune.proxy.evaluate import mean_tokens, predict

    layer_tokens = []
    try:
        with contextlib.nullcontext() if pruner == UNPRUNED else pruned(model, pruner, keep):
            predict(model, processor, items, batch_size=batch_size, layer_tokens=layer_tokens)
    except ValueError:
        return None
    return mean_tokens(layer_tokens)


def keep_for_mean(probe, target: float) -> tuple[int, float] | None:
    """The keep in [1, 256] whose mean (``probe(keep)``, non-decreasing in keep, None where refused) is
    nearest ``target``: keep=target when that is within 1%, else a bisection; None if nothing runs."""
    seen: dict[int, float | None] = {}

    def mean(k: int) -> float | None:
        if k not in seen:
            seen[k] = probe(k)
        return seen[k]

    first = mean(round(target))
    if first is not None and abs(first - target) <= 0.01 * target:
        return round(target), first
    lo, hi = 1, 256  # the least keep whose mean reaches the target lies in [lo, hi]
    while lo < hi:
        mid = (lo + hi) // 2
        m = mean(mid)
        if m is not None and m >= target:
            hi = mid
        else:
            lo = mid + 1
    measured = [(abs(m - target), k, m) for k, m in seen.items() if m is not None and k in (lo - 1, lo)]
    measured = measured or [(abs(m - target), k, m) for k, m in seen.items() if m is not None]
    if not measured:
        return None
    _, k, m = min(measured)
    return k, m


TOLERANCE = 0.10  # a pruner whose nearest mean misses the target by more gets "-"


def equal_mean_table(results: dict, pruners, targets, kinds, title: str) -> str:
    """Accuracy over ``kinds`` per pruner at each target mean (the keep ``--equal-mean`` chose), with
    the mean measured over all questions."""
    from vtprune.proxy.evaluate import pooled

    runs, counts, chosen = results["runs"], results["kind_counts"], results.get("equal_mean", {})
    base = pooled(runs[UNPRUNED]["by_kind"], counts, kinds)

    def cell(pruner, target):
        keep = chosen.get(pruner, {}).get(f"{target:g}")
        run = runs.get(key(pruner, keep), {}) if keep is not None else {}
        if "by_kind" not in run or "mean_tokens" not in run:
            return "-"
        if abs(run["mean_tokens"] - target) > TOLERANCE * target:
            return f"- (least {run['mean_tokens']:.1f})" if run["mean_tokens"] > target else "-"
        value = pooled(run["by_kind"], counts, kinds)
        return f"{100 * value:.1f} ({100 * value / base:.0f}%) · keep {keep} · {run['mean_tokens']:.1f}"

    n = sum(counts.get(k, 0) for k in kinds)
    lines = [
        f"| {title} ({n} questions) | " + " | ".join(f"mean {t:g}" for t in targets) + " |",
        "|---|" + "---|" * len(targets),
        f"| {UNPRUNED} | " + " | ".join(f"{100 * base:.1f} · 256" for _ in targets) + " |",
    ]
    lines += [f"| {p} | " + " | ".join(cell(p, t) for t in targets) + " |" for p in pruners]
    return "\n".join(lines)


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")


def measure(args, results: dict) -> None:
    """Every run the arguments ask for that ``results`` lacks, saved after each one."""
    import torch

    from vtprune.proxy import data, load_proxy

    torch.set_num_threads(args.threads)
    model, processor = load_proxy(projector=args.projector)
    print(f"machine: {platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}", flush=True)
    items = data.subset("test", args.n, args.seed)
    todo = [(UNPRUNED, None)]
    if args.equal_mean is None:
        todo += [(p, k) for p in args.pruners for k in args.keeps]
    else:
        chosen = results.setdefault("equal_mean", {})
        probe_items = items[: args.probe]
        for pruner in args.pruners:
            for target in args.equal_mean:
                keeps = chosen.setdefault(pruner, {})
                if f"{target:g}" not in keeps:
                    found = keep_for_mean(
                        lambda k, pruner=pruner: probed_mean(model, processor, probe_items, pruner, k, args.batch_size),
                        target,
                    )
                    if found is None:
                        print(f"{pruner:<16} refused every keep", flush=True)
                        continue
                    keeps[f"{target:g}"] = found[0]
                    save(results, args.results)
                    print(f"{pruner:<16} mean {target:g}: keep {found[0]} (probed mean {found[1]:.1f})", flush=True)
                todo.append((pruner, keeps[f"{target:g}"]))
    for pruner, keep in todo:
        name = key(pruner, keep)
        if name in results["runs"]:
            continue
        try:
            run = run_once(model, processor, items, pruner, keep, args.batch_size)
        except ValueError as error:  # a keep the pruner's rule cannot reach, or a tower it cannot run in
            print(f"{name:<16} refused: {error}", flush=True)
            continue
        results["runs"][name] = run
        save(results, args.results)
        print(f"{name:<16} accuracy {100 * run['accuracy']:5.1f}%  ({run['seconds']:.0f} s)", flush=True)
    if args.means is not None:
        for name, run in results["runs"].items():
            if "mean_tokens" in run:
                continue
            pruner, _, keep = name.rpartition("@") if name != UNPRUNED else (UNPRUNED, "", None)
            mean = probed_mean(model, processor, items[: args.means], pruner, keep and int(keep), args.batch_size)
            if mean is not None:
                run["mean_tokens"], run["mean_tokens_questions"] = round(mean, 2), args.means
                save(results, args.results)
                print(f"{name:<16} mean tokens per layer {mean:.1f} (first {args.means} questions)", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    results = load_results(args.results, args)
    if "kind_counts" not in results:
        from vtprune.proxy import data
        from vtprune.proxy.evaluate import kind_counts

        results["kind_counts"] = kind_counts(data.subset("test", args.n, args.seed))
    if not args.plot_only:
        measure(args, results)
    from vtprune.proxy.evaluate import IMAGE_READING

    if args.equal_mean is not None:
        print("questions that need the image, at equal mean visual tokens per decoder layer")
        print("(accuracy %, share of unpruned, the keep that gives the mean, and the mean over all questions):")
        print(equal_mean_table(results, args.pruners, args.equal_mean, IMAGE_READING, "shape + colour"))
        return 0
    headline = pooled_table(results, args.pruners, args.keeps, IMAGE_READING, "shape + colour")
    if headline:
        print("questions that need the image (accuracy %, and share of unpruned; · mean visual tokens per layer):")
        print(headline + "\n")
        print("yes/no questions (the proxy answers them from a prior):")
        print(pooled_table(results, args.pruners, args.keeps, ("yes/no present", "yes/no absent"), "yes/no") + "\n")
        print("all questions:")
    print(markdown_table(results, args.pruners, args.keeps))
    by_kind = kind_table(results, args.pruners, args.keeps)
    if by_kind:
        print("\naccuracy by kind of question (yes/no split by whether the named shape or colour is in the image):")
        print(by_kind)
    if args.plot is not None:
        plot(results, args.pruners, args.keeps, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
