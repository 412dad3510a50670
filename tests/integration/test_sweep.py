"""Sweeps: the shipped sweep files are valid, and a real (tiny) sweep runs, resumes and reports."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra)")

from vtprune.evaluation import sweep as sweeps
from vtprune.evaluation.task_data import write_shapes
from vtprune.testing import save_tiny_llava_hf

ROOT = Path(__file__).resolve().parents[2]
SWEEP_FILES = sorted((ROOT / "eval" / "sweeps").glob("*.yaml"))


@pytest.mark.slow  # lmms-eval's task index takes seconds to build
def test_the_shipped_sweeps_name_known_pruners_tasks_and_metrics():
    assert {p.stem for p in SWEEP_FILES} >= {"proxy", "llava15_7b", "llava_next_7b", "qwen2_vl_7b"}
    for path in SWEEP_FILES:
        sweep = sweeps.load_sweep(path)
        sweeps.check_tasks(sweep, ROOT)
        assert sweep.cells()[0] == ("none", None) and len(sweep.cells()) == 1 + len(sweep.pruners) * len(sweep.keeps)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pruners": ["divprnue"]}, "unknown pruners"),
        ({"keeps": [0]}, "keep must be >= 1"),
        ({"colour": 1}, "unknown keys"),
        ({"metrics": {}}, "metrics must name one metric for each task"),
    ],
)
def test_bad_sweep_files_are_refused(tmp_path, change, message):
    import yaml

    raw = {"name": "x", "pretrained": "m", "tasks": ["pope"], "metrics": {"pope": "pope_f1_score"},
           "pruners": ["divprune"], "keeps": [64]}  # fmt: skip
    raw.update(change)
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        sweeps.load_sweep(path)


@pytest.mark.slow  # lmms-eval's task index takes seconds to build
def test_unknown_tasks_and_metrics_are_refused_before_anything_runs():
    sweep = sweeps.Sweep("x", "m", ["popee"], {"popee": "acc"}, ["divprune"], [64])
    with pytest.raises(ValueError, match="lmms-eval knows no task 'popee'"):
        sweeps.check_tasks(sweep, ROOT)
    sweep = sweeps.Sweep("x", "m", ["pope"], {"pope": "accuracy"}, ["divprune"], [64])
    with pytest.raises(ValueError, match="task pope has no metric 'accuracy'; it has"):
        sweeps.check_tasks(sweep, ROOT)


@pytest.mark.slow
def test_a_tiny_sweep_runs_resumes_and_writes_table_and_plot(tmp_path, monkeypatch):
    model_dir = save_tiny_llava_hf(tmp_path / "tiny")
    write_shapes(tmp_path / "data", n_images=4)
    sweep = sweeps.Sweep(
        name="tiny",
        pretrained=str(model_dir),
        tasks=["vtprune_shapes_yes_no", "vtprune_shapes_choice"],
        metrics={"vtprune_shapes_yes_no": "accuracy", "vtprune_shapes_choice": "acc"},
        pruners=["divprune"],
        keeps=[16],
        model_args={"device": "cpu"},
        batch_size=2,
        include_path="eval/tasks",
        env={"VTPRUNE_EVAL_DATA": str(tmp_path / "data"), "HF_DATASETS_CACHE": str(tmp_path / "cache")},
    )
    runs = tmp_path / "runs"
    cells = sweeps.run(sweep, runs, ROOT, log=lambda _: None)
    assert set(cells) == {"unpruned", "divprune@16"}
    assert cells["divprune@16"]["kept_visual_tokens"] == 16 and cells["unpruned"]["kept_visual_tokens"] == 576

    def no_runs(*_, **__):
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(subprocess, "run", no_runs)
    logged = []
    assert sweeps.run(sweep, runs, ROOT, log=logged.append) == cells
    assert logged == ["[unpruned] done, skipped", "[divprune@16] done, skipped"]
    assert sweeps.finished_cells(sweep, runs) == cells
    md = sweeps.report(sweep, cells, tmp_path / "results")
    text = md.read_text()
    base = cells["unpruned"]["scores"]["vtprune_shapes_choice"]
    pruned = cells["divprune@16"]["scores"]["vtprune_shapes_choice"]
    assert f"| divprune | {pruned:.4f}" in text and "### vtprune_shapes_choice (acc)" in text
    share = f" ({100 * pruned / base:.1f}%)" if base else ""
    assert f"| divprune | {pruned:.4f}{share} · 16.0 |" in text  # the mean per decoder layer beside keep
    assert json.loads((tmp_path / "results" / "tiny.json").read_text()) == cells
    assert (tmp_path / "results" / "tiny.png").stat().st_size > 10_000


def test_cell_commands_run_lmms_eval_directly_or_through_a_launcher(tmp_path):
    sweep = sweeps.load_sweep(ROOT / "eval" / "sweeps" / "llava15_7b.yaml")
    cmd = sweeps.command(sweep, "fastv", 64, tmp_path / "out", ROOT)
    assert cmd[1:3] == ["-m", "lmms_eval"] and "--model_args" in cmd
    assert cmd[cmd.index("--model_args") + 1] == (
        "pretrained=llava-hf/llava-1.5-7b-hf,dtype=float16,attn_implementation=sdpa,pruner=fastv,layer=2,keep=64"
    )
    sweep.launcher = ["accelerate", "launch", "--num_processes", "8"]
    cmd = sweeps.command(sweep, "none", None, tmp_path / "out", ROOT)
    assert cmd[:6] == ["accelerate", "launch", "--num_processes", "8", "-m", "lmms_eval"]
    assert cmd[cmd.index("--model_args") + 1].endswith("pruner=none")
