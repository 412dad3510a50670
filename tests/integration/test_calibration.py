"""VFlowOpt's calibration (``vtprune.calibration``): what it optimises is the mean cosine of the last
prompt token's final state pruned vs unpruned, the same seed gives the same settings, a logged run
resumes without evaluating again, the file it writes is what ``vflowopt`` loads; its command line."""

import json

import pytest
import torch

import vtprune
from vtprune.calibration import calibrate_vflowopt, last_token_state, main
from vtprune.testing import batch_inputs, make_prompt

pytest.importorskip("skopt")


@pytest.fixture
def samples(model):
    prompt = make_prompt(model, [1, 5, 6, 7], [8, 9, 10, 11, 12])
    return [batch_inputs(model, [prompt], seed=s) for s in range(2)]


def mean_cosine(model, samples, settings, keep):
    unpruned = [last_token_state(model, s) for s in samples]
    with vtprune.apply(model, "vflowopt", keep=keep, settings=settings):
        pruned = [last_token_state(model, s) for s in samples]
    return sum(float(torch.cosine_similarity(a, b, dim=-1)) for a, b in zip(pruned, unpruned)) / len(samples)


@pytest.mark.slow
def test_the_settings_written_score_what_the_file_says_and_runs_repeat_and_resume(model, samples, tmp_path):
    out, log = tmp_path / "settings.json", tmp_path / "log.jsonl"
    options = dict(keep=48, iterations=5, initial_points=3, seed=1)
    partial = calibrate_vflowopt(model, samples, **{**options, "iterations": 2}, log=log)
    evaluations = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(evaluations) == 2 and partial.target == pytest.approx(48 / 576)
    resumed = calibrate_vflowopt(model, samples, **options, log=log, out=out)
    assert len(log.read_text().splitlines()) == 5  # the first two were not evaluated again
    assert resumed == calibrate_vflowopt(model, samples, **options)  # the same seed, the same settings
    about = json.loads(out.read_text())["about"]
    assert about["objective"] == max(json.loads(line)["score"] for line in log.read_text().splitlines())
    assert mean_cosine(model, samples, str(out), 48) == pytest.approx(about["objective"], abs=1e-5)
    with pytest.raises(ValueError, match="written by another calibration"):
        calibrate_vflowopt(model, samples, **{**options, "seed": 2}, log=log)


def test_bad_arguments_are_refused_before_the_model_runs(model, samples):
    cases = [
        (dict(keep=0), "keep must be >= 1"),
        (dict(iterations=0), "iterations must be an int >= 1"),
        (dict(seed=1.5), "seed must be an int"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            calibrate_vflowopt(model, samples, **options)
    with pytest.raises(ValueError, match="samples must be a non-empty list"):
        calibrate_vflowopt(model, [])
    with vtprune.apply(model, "divprune"), pytest.raises(ValueError, match="remove the pruner"):
        calibrate_vflowopt(model, samples)


def test_the_command_writes_a_settings_file_vflowopt_loads(tmp_path, capsys):
    out = tmp_path / "tiny.json"
    args = ["--model", "tiny", "--samples", "1", "--iterations", "2", "--initial-points", "2", "--out", str(out)]
    assert main(args) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    settings = vtprune.VFlowOptSettings.load(out)
    assert vtprune.VFlowOpt(keep=64, settings=out).pruners[0].plan.given == settings
    with pytest.raises(SystemExit) as exit:
        main(["--model", "tiny", "--data", "questions.jsonl", "--out", str(out)])
    assert exit.value.code == 2 and "give --data with a checkpoint directory" in capsys.readouterr().err
