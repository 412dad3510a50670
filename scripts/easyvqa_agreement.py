"""Does lmms-eval's ``vtprune_easyvqa`` score agree with ``vtprune.proxy.evaluate`` on the same questions?

    python scripts/easyvqa_agreement.py eval/runs/proxy/unpruned
    python scripts/easyvqa_agreement.py eval/runs/proxy/divprune@16 --pruner divprune --keep 16

(``eval/runs/proxy/`` holds the lmms-eval outputs of ``scripts/sweep.py eval/sweeps/proxy.yaml``.)

Reads a finished lmms-eval run of ``vtprune_easyvqa`` or ``vtprune_easyvqa_image_reading`` (its samples
log: the log-likelihood of each of the 13 answers), asks ``vtprune.proxy.evaluate.predict`` the same
questions on the same model (unpruned, or under ``--pruner``/``--keep``), and prints both accuracies,
how often the two answers agree, and the disagreements. The two differ by design in one way:
lmms-eval scores an answer by the log-likelihood of all its tokens, ``evaluate`` by the logit of
its first token only (three answers, "rectangle", "triangle" and "teal", are two tokens for SmolLM2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path


def lmms_predictions(run: Path, data_dir: Path) -> list[dict]:
    """The run's documents (from the task's JSON lines; the samples log names them by index) with the
    answer lmms-eval chose: the best log-likelihood among the 13."""
    paths = sorted(run.rglob("*_samples_vtprune_easyvqa*.jsonl"))
    if not paths:
        raise SystemExit(f"no vtprune_easyvqa samples log under {run}")
    task = paths[-1].stem.split("_samples_")[1]
    data = data_dir / ("easyvqa_image_reading.jsonl" if task.endswith("image_reading") else "easyvqa.jsonl")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    out = []
    for line in paths[-1].read_text().splitlines():
        sample = json.loads(line)
        doc = rows[sample["doc_id"]]
        if doc["answer"] != sample["target"]:
            raise SystemExit(f"{data} is not the data of {run} (document {sample['doc_id']} differs)")
        scores = [float(ll) for ll, _ in sample["filtered_resps"]]
        best = max(range(len(scores)), key=scores.__getitem__)
        out.append({**doc, "lmms": doc["choices"][best]})
    return sorted(out, key=lambda d: d["question_id"])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="an lmms-eval --output_path of a vtprune_easyvqa run")
    p.add_argument("--pruner", default=None)
    p.add_argument("--keep", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", type=Path, default=os.environ.get("VTPRUNE_EVAL_DATA"), help="the tasks' data directory")
    args = p.parse_args(argv)
    import torch

    import vtprune
    from vtprune.proxy import data, load_proxy
    from vtprune.proxy.evaluate import predict

    torch.set_num_threads(args.threads)
    if args.data is None:
        p.error("set VTPRUNE_EVAL_DATA or pass --data")
    docs = lmms_predictions(args.run, args.data)
    questions = [data.Question(d["question"], d["answer"], int(Path(d["image"]).stem), "test") for d in docs]
    model, processor = load_proxy()
    if args.pruner:
        with vtprune.apply(model, args.pruner, keep=args.keep):
            theirs = predict(model, processor, questions)
    else:
        theirs = predict(model, processor, questions)
    n = len(docs)
    lmms_right = sum(d["lmms"] == d["answer"] for d in docs)
    evaluate_right = sum(t == d["answer"] for t, d in zip(theirs, docs))
    agree = sum(t == d["lmms"] for t, d in zip(theirs, docs))
    print(f"{n} questions from {args.run}; pruner {args.pruner or 'none'} keep {args.keep}")
    print(f"lmms-eval (all answer tokens):  {lmms_right / n:.4f} ({lmms_right}/{n})")
    print(f"proxy.evaluate (first token):   {evaluate_right / n:.4f} ({evaluate_right}/{n})")
    print(f"same answer:                    {agree / n:.4f} ({agree}/{n})")
    pairs = Counter((d["lmms"], t) for t, d in zip(theirs, docs) if t != d["lmms"])
    for (mine, other), count in pairs.most_common():
        print(f"  lmms-eval {mine!r} vs evaluate {other!r}: {count}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
