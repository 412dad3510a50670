"""Sweeps: pruner x keep x tasks through the lmms-eval command line, resumable, with a table and a plot.

A sweep file (``eval/sweeps/*.yaml``)::

    name: proxy                           # results go to eval/results/<name>.md/.json/.png
    pretrained: $VTPRUNE_PROXY_DIR        # model directory or Hub id; $VARS are expanded
    model_args: {device: cpu}             # more --model_args for every cell
    tasks: [vtprune_easyvqa]
    metrics: {vtprune_easyvqa: image_reading_accuracy}   # the metric tabulated per task
    pruners: [divprune, fastv]            # each also runs with keep=... from keeps
    pruner_args: {fastv: {layer: 2}}      # optional, per pruner
    keeps: [64, 128, 192]
    batch_size: 8
    limit: 200                            # optional: first N documents per task
    include_path: eval/tasks              # optional, relative to the repository
    launcher: []                          # optional, e.g. [accelerate, launch, --num_processes, "8"]

Every sweep also runs the unpruned model (``pruner=none``). A cell is done when its output directory
holds a results JSON; finished cells are skipped on the next run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import vtprune

UNPRUNED = "none"
KNOWN_KEYS = {
    "name",
    "pretrained",
    "model_args",
    "tasks",
    "metrics",
    "pruners",
    "pruner_args",
    "keeps",
    "batch_size",
    "limit",
    "include_path",
    "launcher",
    "env",
}


@dataclass
class Sweep:
    name: str
    pretrained: str
    tasks: list[str]
    metrics: dict[str, str]
    pruners: list[str]
    keeps: list
    model_args: dict = field(default_factory=dict)
    pruner_args: dict = field(default_factory=dict)
    batch_size: int = 1
    limit: int | None = None
    include_path: str | None = None
    launcher: list[str] = field(default_factory=list)
    env: dict = field(default_factory=dict)

    def cells(self) -> list[tuple[str, object]]:
        """(pruner, keep) for every run: the unpruned model first (keep None)."""
        return [(UNPRUNED, None)] + [(p, k) for p in self.pruners for k in self.keeps]

    def model_args_for(self, pruner: str, keep) -> str:
        args = {"pretrained": os.path.expandvars(self.pretrained), **self.model_args, "pruner": pruner}
        if pruner != UNPRUNED:
            args.update(self.pruner_args.get(pruner, {}), keep=keep)
        return ",".join(f"{k}={v}" for k, v in args.items())


def cell_name(pruner: str, keep) -> str:
    return "unpruned" if pruner == UNPRUNED else f"{pruner}@{keep}"


def load_sweep(path) -> Sweep:
    """Read and check a sweep file; every error names the file and the key."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep file {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = sorted(set(raw) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; allowed: {sorted(KNOWN_KEYS)}")
    missing = [k for k in ("name", "pretrained", "tasks", "metrics", "pruners", "keeps") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    sweep = Sweep(**raw)
    bad = [p for p in sweep.pruners if p not in vtprune.available()]
    if bad:
        raise ValueError(f"{path}: unknown pruners {bad}; available: {', '.join(vtprune.available())}")
    for pruner in sweep.pruners:
        for keep in sweep.keeps:
            vtprune.api.make_pruner(pruner, keep=keep, **sweep.pruner_args.get(pruner, {}))
    if set(sweep.metrics) != set(sweep.tasks):
        raise ValueError(f"{path}: metrics must name one metric for each task {sweep.tasks}, got {sweep.metrics}")
    return sweep


def check_tasks(sweep: Sweep, root: Path) -> None:
    """Every task is known to lmms-eval (with the sweep's include path) and has the metric the sweep
    tabulates; a ValueError naming the first that is not. Reads task configs only, downloads nothing."""
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(
        verbosity="ERROR", include_path=str(root / sweep.include_path) if sweep.include_path else None
    )
    for task in sweep.tasks:
        if task not in manager.all_tasks:
            raise ValueError(
                f"sweep {sweep.name}: lmms-eval knows no task {task!r} (include_path: {sweep.include_path})"
            )
        metrics = [m["metric"] for m in manager._get_config(task).get("metric_list", [])]
        if sweep.metrics[task] not in metrics:
            raise ValueError(f"sweep {sweep.name}: task {task} has no metric {sweep.metrics[task]!r}; it has {metrics}")


def command(sweep: Sweep, pruner: str, keep, out: Path, root: Path) -> list[str]:
    """The lmms-eval command line of one cell (with the sweep's launcher in front)."""
    python = [sys.executable, "-m", "lmms_eval"] if not sweep.launcher else ["-m", "lmms_eval"]
    cmd = [*sweep.launcher, *python, "--model", "vtprune", "--model_args", sweep.model_args_for(pruner, keep)]
    cmd += ["--tasks", ",".join(sweep.tasks), "--batch_size", str(sweep.batch_size)]
    cmd += ["--output_path", str(out), "--log_samples"]
    if sweep.include_path:
        cmd += ["--include_path", str(root / sweep.include_path)]
    if sweep.limit:
        cmd += ["--limit", str(sweep.limit)]
    return cmd


def results_file(out: Path) -> Path | None:
    found = sorted(out.rglob("*_results.json"))
    return found[-1] if found else None


def read_cell(sweep: Sweep, out: Path) -> dict:
    """Scores per task (the sweep's metric) and token counts of a finished cell."""
    results = json.loads(results_file(out).read_text())
    scores = {}
    for task in sweep.tasks:
        value = results["results"].get(task, {}).get(f"{sweep.metrics[task]},none")
        if not isinstance(value, (int, float)):
            raise RuntimeError(f"{out}: no {sweep.metrics[task]} for {task} in the results (the run failed?)")
        scores[task] = float(value)
    throughput = results.get("throughput", {})
    return {
        "scores": scores,
        "kept_visual_tokens": throughput.get("avg_kept_visual_tokens"),
        "mean_layer_visual_tokens": throughput.get("avg_mean_layer_visual_tokens"),
        "visual_tokens": throughput.get("avg_visual_tokens"),
        "prefill_ms": throughput.get("avg_prefill_ms"),
        "seconds": results.get("total_evaluation_time_seconds"),
    }


def finished_cells(sweep: Sweep, runs_dir: Path) -> dict[str, dict]:
    """The results of the cells that have finished, by cell name (nothing is run)."""
    names = [cell_name(p, k) for p, k in sweep.cells()]
    return {name: read_cell(sweep, runs_dir / name) for name in names if results_file(runs_dir / name) is not None}


def run(sweep: Sweep, runs_dir: Path, root: Path, dry_run: bool = False, log=print) -> dict[str, dict]:
    """Run every unfinished cell; return the finished cells' results by cell name."""
    check_tasks(sweep, root)
    done = {}
    env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), **sweep.env}
    for pruner, keep in sweep.cells():
        name = cell_name(pruner, keep)
        out = runs_dir / name
        if results_file(out) is None:
            cmd = command(sweep, pruner, keep, out, root)
            log(f"[{name}] {' '.join(cmd)}")
            if dry_run:
                continue
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "lmms_eval.log", "w") as stream:
                subprocess.run(cmd, env=env, stdout=stream, stderr=subprocess.STDOUT, check=False)
            if results_file(out) is None:
                raise RuntimeError(f"[{name}] lmms-eval wrote no results; see {out / 'lmms_eval.log'}")
        else:
            log(f"[{name}] done, skipped")
        done[name] = read_cell(sweep, out)
    return done


def table(sweep: Sweep, cells: dict[str, dict]) -> str:
    """Markdown: per task, score, % of unpruned and mean visual tokens per decoder layer per pruner
    (rows) and keep (columns)."""
    lines = []
    base = cells.get("unpruned")
    for task in sweep.tasks:
        metric = sweep.metrics[task]
        lines += [f"### {task} ({metric})", ""]
        if base is not None:
            lines += [f"Unpruned: {base['scores'][task]:.4f} ({base['visual_tokens']:.0f} visual tokens)", ""]
        lines += ["| pruner | " + " | ".join(f"keep {k}" for k in sweep.keeps) + " |"]
        lines += ["|---" * (len(sweep.keeps) + 1) + "|"]
        for pruner in sweep.pruners:
            row = []
            for keep in sweep.keeps:
                cell = cells.get(cell_name(pruner, keep))
                if cell is None:
                    row.append("-")
                    continue
                score = cell["scores"][task]
                share = f" ({100 * score / base['scores'][task]:.1f}%)" if base and base["scores"][task] else ""
                # keep means different budgets across pruners (FastV's tokens after its drop, the
                # multi-drop pruners' mean per layer): the mean per layer beside it compares like for like
                mean = cell.get("mean_layer_visual_tokens")
                row.append(f"{score:.4f}{share}" + ("" if mean is None else f" · {mean:.1f}"))
            lines.append(f"| {pruner} | " + " | ".join(row) + " |")
        lines.append("")
    note = "Score (% of unpruned) · mean visual tokens per decoder layer."
    lines += [f"{note} Visual tokens, means over the documents (timings: `vtprune profile`):", ""]
    lines += ["| cell | reaching the last layer | per decoder layer |", "|---|---|---|"]
    for name, cell in cells.items():
        tokens = [cell.get(k) for k in ("kept_visual_tokens", "mean_layer_visual_tokens")]
        lines.append(f"| {name} | " + " | ".join("-" if t is None else f"{t:.1f}" for t in tokens) + " |")
    return "\n".join(lines) + "\n"


def plot(sweep: Sweep, cells: dict[str, dict], path: Path) -> None:
    """Score vs visual tokens per decoder layer (what prefill compute follows; the kept tokens for
    vision-stage pruners), one line per pruner, and the unpruned score as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweep.tasks), figsize=(5.5 * len(sweep.tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], sweep.tasks):
        for pruner in sweep.pruners:
            points = [
                (cells[n]["mean_layer_visual_tokens"], cells[n]["scores"][task])
                for n in (cell_name(pruner, k) for k in sweep.keeps)
                if n in cells
            ]
            if points:
                xs, ys = zip(*sorted(points))
                ax.plot(xs, ys, marker="o", label=pruner)
        if "unpruned" in cells:
            ax.axhline(cells["unpruned"]["scores"][task], color="black", linestyle="--", label="unpruned")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("visual tokens per decoder layer (mean over layers)")
        ax.set_ylabel(sweep.metrics[task])
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"sweep {sweep.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(sweep: Sweep, cells: dict[str, dict], results_dir: Path, header: str = "") -> Path:
    """Write <results_dir>/<name>.md, .json and .png; returns the .md path. The .md's plot link is
    relative: the three files stay together."""
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{sweep.name}.json").write_text(json.dumps(cells, indent=1) + "\n")
    plot(sweep, cells, results_dir / f"{sweep.name}.png")
    md = results_dir / f"{sweep.name}.md"
    md.write_text(f"# Sweep `{sweep.name}`\n\n{header}{table(sweep, cells)}\n![plot]({sweep.name}.png)\n")
    return md
