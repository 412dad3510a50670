"""``vtprune eval``: lmms-eval with vtprune's model, and an exit status a script can trust.

lmms-eval exits 0 even when the evaluation raises (it logs the error and goes on). ``vtprune eval``
takes lmms-eval's own arguments, checks ``--model_args`` of the ``vtprune`` model before anything is
loaded (one line, exit 2), runs ``python -m lmms_eval`` with them (``--model vtprune`` unless another
model is named), and exits 1 when the run wrote no results (lmms-eval's log above says why), else with
lmms-eval's own status.

    vtprune eval --model_args pretrained=DIR,pruner=divprune,keep=64 --tasks pope --output_path runs/
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

USAGE = "vtprune eval [lmms-eval arguments]  (see python -m lmms_eval --help)"


def _fail(message: str) -> int:
    print(f"vtprune eval: {message}", file=sys.stderr)
    return 2


def check_model_args(text: str) -> str | None:
    """vtprune's message for bad ``--model_args`` of its lmms-eval model, or None when they are fine."""
    from lmms_eval.utils import simple_parse_args_string

    from vtprune.evaluation.options import parse_model_args

    try:
        options = parse_model_args(**simple_parse_args_string(text))
        options.pruner_config()
    except (ValueError, TypeError) as error:
        return str(error)
    local = options.pretrained.startswith(("/", "./", "../", "~"))
    if local and not Path(options.pretrained).expanduser().exists():
        return f"pretrained={options.pretrained}: no such directory"
    return None


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        return _fail("needs lmms-eval: pip install -e '.[eval]'")
    parser = argparse.ArgumentParser(prog="vtprune eval", usage=USAGE, add_help=False)
    parser.add_argument("--model")
    parser.add_argument("--model_args", default="")
    parser.add_argument("--output_path")
    known, _ = parser.parse_known_args(argv)
    args = list(argv)
    if known.model is None:
        args = ["--model", "vtprune", *args]
    if known.model in (None, "vtprune"):
        problem = check_model_args(known.model_args)
        if problem is not None:
            return _fail(problem)
    with tempfile.TemporaryDirectory(prefix="vtprune-eval-") as scratch:
        output = known.output_path
        if output is None:  # the results file is how a failed run is told apart
            output = scratch
            args += ["--output_path", scratch]
        started = time.time()
        status = subprocess.run([sys.executable, "-m", "lmms_eval", *args], check=False).returncode
        if status != 0:
            return status
        written = [p for p in Path(output).rglob("*_results.json") if p.stat().st_mtime >= started - 1]
    if not written:
        print(
            "vtprune eval: lmms-eval wrote no results: the evaluation failed (its log above says why)", file=sys.stderr
        )
        return 1
    return 0
