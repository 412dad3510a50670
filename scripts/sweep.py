"""Run an lmms-eval sweep of pruner x keep x tasks (``eval/sweeps/*.yaml``), resumably, then write
``eval/results/<name>.md`` (scores and % of unpruned), ``.json`` and ``.png`` (score vs kept tokens).

    python scripts/sweep.py eval/sweeps/proxy.yaml                  # runs here, on the CPU
    python scripts/sweep.py eval/sweeps/llava15_7b.yaml              # one GPU
    python scripts/sweep.py eval/sweeps/llava15_7b.yaml --launcher "accelerate launch --num_processes 8"
    python scripts/sweep.py eval/sweeps/proxy.yaml --report-only     # redraw from finished cells

Each cell is one lmms-eval run whose output goes to ``--runs DIR/<name>/<cell>/``; a cell with a
results JSON there is skipped, so an interrupted sweep continues where it stopped.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sweep", type=Path, help="a sweep YAML, e.g. eval/sweeps/proxy.yaml")
    p.add_argument("--runs", type=Path, default=ROOT / "eval" / "runs", help="lmms-eval outputs (default eval/runs)")
    p.add_argument("--results", type=Path, default=ROOT / "eval" / "results", help="tables and plots")
    p.add_argument("--launcher", default=None, help='overrides the file\'s launcher, e.g. "accelerate launch"')
    p.add_argument("--dry-run", action="store_true", help="print the commands of unfinished cells only")
    p.add_argument("--report-only", action="store_true", help="write the table and plot from finished cells")
    args = p.parse_args(argv)
    from loguru import logger  # lmms-eval's logger: its task index is chatty at DEBUG

    logger.remove()
    logger.add(sys.stderr, level="WARNING")
    from vtprune.evaluation import sweep as sweeps

    try:
        sweep = sweeps.load_sweep(args.sweep)
    except (FileNotFoundError, ValueError, TypeError) as error:
        p.error(str(error))
    if args.launcher is not None:
        sweep.launcher = shlex.split(args.launcher)
    runs_dir = args.runs / sweep.name
    if args.report_only:
        cells = sweeps.finished_cells(sweep, runs_dir)
    else:
        cells = sweeps.run(sweep, runs_dir, ROOT, dry_run=args.dry_run)
    if args.dry_run:
        return 0
    header = f"`python scripts/sweep.py {args.sweep}`, {platform.machine()} with {os.cpu_count()} CPU cores.\n\n"
    print(f"wrote {sweeps.report(sweep, cells, args.results, header)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
