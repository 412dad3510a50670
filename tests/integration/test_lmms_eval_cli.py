"""End to end: the real ``lmms-eval`` command on vtprune's offline tasks and a tiny LLaVA saved to disk.

lmms-eval exits 0 even when evaluation fails, so every check reads the results JSON and samples logs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra)")

from vtprune.evaluation.task_data import write_easyvqa, write_shapes
from vtprune.proxy import packages
from vtprune.testing import save_tiny_llava_hf

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# easy-vqa's questions come from the proxy extra (installed in CI); without it the shape tasks still run.
TASKS = ("vtprune_shapes_yes_no", "vtprune_shapes_choice") + (("vtprune_easyvqa",) if packages.available() else ())
N_IMAGES, N_EASYVQA, KEEP = 6, 5, 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmms_eval")
    write_shapes(root / "data", n_images=N_IMAGES)
    if "vtprune_easyvqa" in TASKS:
        write_easyvqa(root / "data", n=N_EASYVQA)
    return root, save_tiny_llava_hf(root / "tiny")


def run_lmms_eval(
    root: Path, model_dir: Path, model_args: str, batch_size: int, out: Path, tasks=TASKS, launcher=None
) -> dict:
    """Run the CLI; return {"results": the results JSON, "samples": {task: [sample, ...]}}."""
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "VTPRUNE_EVAL_DATA": str(root / "data"),
        "HF_DATASETS_CACHE": str(root / "datasets_cache"),
    }
    command = [
        *(launcher or [sys.executable]),
        *("-m", "lmms_eval", "--model", "vtprune"),
        *("--model_args", f"pretrained={model_dir},device=cpu,{model_args}"),
        *("--tasks", ",".join(tasks), "--include_path", str(ROOT / "eval" / "tasks")),
        *("--batch_size", str(batch_size), "--output_path", str(out), "--log_samples"),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    results = sorted(out.rglob("*_results.json"))
    assert results, (
        f"lmms-eval wrote no results (exit {done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    samples = {}
    for task in tasks:
        (path,) = out.rglob(f"*_samples_{task}.jsonl")
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return {"results": json.loads(results[-1].read_text()), "samples": samples, "log": done.stdout + done.stderr}


@pytest.mark.parametrize("pruner", ["divprune", "fastv"])
def test_the_cli_scores_pruned_runs_and_batches_agree(setup, tmp_path, pruner):
    root, model_dir = setup
    runs = {b: run_lmms_eval(root, model_dir, f"pruner={pruner},keep={KEEP}", b, tmp_path / f"b{b}") for b in (4, 1)}
    for batch_size, run in runs.items():
        results = run["results"]
        assert results["config"]["model"] == "vtprune", run["log"][-2000:]
        scores = results["results"]
        for task, metric in zip(TASKS, ("accuracy,none", "acc,none", "accuracy,none")):
            assert 0.0 <= scores[task][metric] <= 1.0, (task, scores.get(task))
        assert len(run["samples"]["vtprune_shapes_yes_no"]) == N_IMAGES
        assert len(run["samples"].get("vtprune_easyvqa", [None] * N_EASYVQA)) == N_EASYVQA
        for task_samples in run["samples"].values():
            for sample in task_samples:
                for counts in sample["token_counts"]:
                    assert (counts["visual_tokens"], counts["kept_visual_tokens"]) == (576, KEEP)
                    assert counts["batch_size"] <= batch_size and counts["prefill_ms"] > 0
        assert results["throughput"]["avg_kept_visual_tokens"] == KEEP
        # Every metric a task reports is a number: none left as an empty list by a missing metric_list entry.
        empty = {(t, m) for t, metrics in scores.items() for m, v in metrics.items() if v == []}
        assert not empty, empty
        assert "target_delimiter" not in run["log"]  # our tasks' empty delimiter is by design, not warned about
    for task in TASKS:
        four = [s["filtered_resps"] for s in runs[4]["samples"][task]]
        one = [s["filtered_resps"] for s in runs[1]["samples"][task]]
        if task == "vtprune_shapes_yes_no":
            assert four == one
        else:  # (log-likelihood, greedy) per choice, logged as strings
            for a, b in zip(four, one):
                assert [g for _, g in a] == [g for _, g in b]
                assert [float(x) for x, _ in a] == pytest.approx([float(x) for x, _ in b], abs=1e-4)
    assert _scores(runs[4]) == _scores(runs[1])


def _scores(run) -> dict:
    return {
        (task, metric): value
        for task, metrics in run["results"]["results"].items()
        for metric, value in metrics.items()
        if metric.endswith(",none") and isinstance(value, float)
    }


def test_unpruned_runs_and_bad_pruner_options_are_refused_by_vtprune(setup, tmp_path):
    root, model_dir = setup
    run = run_lmms_eval(root, model_dir, "pruner=none", 2, tmp_path / "none", tasks=TASKS[:1])
    counts = [c for s in run["samples"][TASKS[0]] for c in s["token_counts"]]
    assert {(c["visual_tokens"], c["kept_visual_tokens"]) for c in counts} == {(576, 576)}
    with pytest.raises(AssertionError, match="lmms-eval wrote no results") as error:
        run_lmms_eval(root, model_dir, "pruner=divprune,keep=0", 1, tmp_path / "bad", tasks=TASKS[:1])
    assert "keep must be >= 1 when an int" in str(error.value)


def test_accelerate_launch_shards_the_requests_over_two_cpu_processes(setup, tmp_path):
    """``accelerate launch --multi_gpu`` on a machine without GPUs starts CPU processes (gloo);
    lmms-eval gives each rank its share of the documents and gathers the samples on rank 0."""
    root, model_dir = setup
    args = f"pruner=divprune,keep={KEEP}"
    alone = run_lmms_eval(root, model_dir, args, 2, tmp_path / "one", tasks=TASKS[:2])
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launcher += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    two = run_lmms_eval(root, model_dir, args, 2, tmp_path / "two", tasks=TASKS[:2], launcher=launcher)
    assert "Running on rank 1" in two["log"]
    for task in TASKS[:2]:
        by_doc = {s["doc_id"]: s for s in two["samples"][task]}
        assert sorted(by_doc) == list(range(N_IMAGES))
        for sample in alone["samples"][task]:
            other = by_doc[sample["doc_id"]]["filtered_resps"]
            if task == "vtprune_shapes_yes_no":
                assert other == sample["filtered_resps"]
            else:
                assert [float(x) for x, _ in other] == pytest.approx(
                    [float(x) for x, _ in sample["filtered_resps"]], abs=1e-4
                )


def _vtprune_eval(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "VTPRUNE_EVAL_DATA": str(root / "data")}
    env["HF_DATASETS_CACHE"] = str(root / "datasets_cache")
    command = [sys.executable, "-m", "vtprune", "eval", "--include_path", str(ROOT / "eval" / "tasks"), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "model_args, message",
    [
        ("pruner=bogus", "unknown pruner 'bogus'"),
        ("pruner=divprune,keep=abc", "keep must be an int"),
        ("pruner=divprune,keep=0", "keep must be >= 1"),
        ("pruner=divprune,kep=16", "it takes keep"),
    ],
)
def test_vtprune_eval_refuses_bad_model_args_with_one_line_and_exit_2(setup, tmp_path, model_args, message):
    root, model_dir = setup
    done = _vtprune_eval(root, "--model_args", f"pretrained={model_dir},{model_args}", "--tasks", TASKS[0])
    assert done.returncode == 2 and message in done.stderr
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def test_vtprune_eval_exits_non_zero_when_lmms_eval_fails_and_zero_when_it_works(setup, tmp_path):
    root, model_dir = setup
    missing = _vtprune_eval(root, "--model_args", "pretrained=/nonexistent,pruner=divprune", "--tasks", TASKS[0])
    assert missing.returncode == 2 and "pretrained=/nonexistent: no such directory" in missing.stderr
    # a failure only lmms-eval sees (a directory that holds no model), after which lmms-eval itself exits 0
    (tmp_path / "empty").mkdir()
    failed = _vtprune_eval(root, "--model_args", f"pretrained={tmp_path / 'empty'},device=cpu", "--tasks", TASKS[0])
    assert failed.returncode == 1 and "lmms-eval wrote no results" in failed.stderr, failed.stderr[-2000:]
    args = f"pretrained={model_dir},device=cpu,pruner=divprune,keep={KEEP}"
    out = tmp_path / "out"
    done = _vtprune_eval(root, "--model_args", args, "--tasks", TASKS[0], "--output_path", str(out), "--limit", "2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list(out.rglob("*_results.json"))
