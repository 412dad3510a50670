"""`python -m vtprune demo` runs every pruner and reports what it kept (and, on the proxy, answered)."""

import re
import subprocess
import sys

import pytest

import vtprune
from vtprune import __main__ as demo
from vtprune import proxy
from vtprune.__main__ import main

REFUSED = re.compile(r"^(\S+)\s+refused: (.*)$", re.MULTILINE)
ROW = re.compile(r"^(\S+)\s+(\d+)\s+(.+?)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)x \(([\d.]+)-([\d.]+)\)")


def rows(out: str) -> dict[str, re.Match]:
    """The tiny demo's table: pruner -> (name, kept, per layer, unpruned ms, prefill ms, speed-up, IQR)."""
    return {m.group(1): m for m in map(ROW.match, out.splitlines()) if m}


# Pipelines whose keep is a mean per decoder layer: the tokens entering the tiny model's decoder at keep 32
# (mustdrop: its tower merge leaves 76%; aim: its merge 252; vflowopt: its first stage r_v of 576).
ENTERING = {"mustdrop": 438, "aim": 252, "vflowopt": 67}


@pytest.mark.slow
def test_tiny_demo_prints_every_pruner(capsys):
    assert main(["demo", "--tiny", "--keep", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "prefill times: one run, unpruned and pruned alternately" in out
    table = rows(out)
    refused = dict(REFUSED.findall(out))
    assert sorted([*table, *refused]) == vtprune.available()
    assert list(refused) == ["mustdrop_merge"]  # 3x3 windows leave at least 64 of 576 patches
    assert "leave at least 64 of 576 patches" in refused["mustdrop_merge"]
    for name, row in table.items():
        _, kept, per_layer, unpruned_ms, pruned_ms, ratio, low, high = row.groups()
        # one run: the speed-up is that run's ratio and its interquartile range is that one value
        assert float(unpruned_ms) > 0 and float(unpruned_ms) / float(pruned_ms) == pytest.approx(float(ratio), rel=0.05)
        assert low == high == ratio
        if issubclass(vtprune.registry.pruner_class(name), vtprune.ScheduledPruner):
            # keep is the mean per decoder layer; the tiny model's 4 layers leave few tokens at the end
            assert int(kept) < 32 and "(576.." in per_layer
        elif name in ENTERING:  # the same, after a first stage left fewer tokens
            assert int(kept) < 32 and f"({ENTERING[name]}.." in per_layer
        elif name == "fastv":
            assert kept == "32" and "(576..32)" in per_layer  # its first layers still see all 576
        elif name == "catp":  # halfway before the model (304), keep at the end
            assert kept == "32" and "(304..32)" in per_layer
        else:
            assert kept == "32" and per_layer == "32"
    assert "pruned nothing" not in out


def _fixed_times(unpruned_ms: float, pruned_ms: float):
    """A stand-in for ``paired_seconds`` that runs both sides once and reports fixed times."""

    def paired_seconds(fn_a, fn_b, repeats, warmup=1):
        fn_a()
        fn_b()
        return [unpruned_ms / 1e3] * repeats, [pruned_ms / 1e3] * repeats

    return paired_seconds


def test_keep_all_with_a_speed_up_beyond_the_noise_is_flagged(capsys, monkeypatch):
    monkeypatch.setattr(demo, "paired_seconds", _fixed_times(unpruned_ms=20.0, pruned_ms=10.0))
    assert main(["demo", "--tiny", "--keep", "1.0", "--repeats", "3"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert {row.group(2) for row in table.values()} == {"576"}  # keep 1.0 prunes nothing
    assert {row.group(6) for row in table.values()} == {"2.00"}
    assert not REFUSED.findall(out)  # keep 1.0 every pruner can
    warning = next(line for line in out.splitlines() if line.startswith("warning:"))
    assert f"{', '.join(sorted(table))} pruned nothing at this keep" in warning and "raise --repeats" in warning


def test_a_real_reduction_or_a_speed_up_within_the_noise_is_not_flagged(capsys, monkeypatch):
    monkeypatch.setattr(demo, "paired_seconds", _fixed_times(unpruned_ms=20.0, pruned_ms=10.0))
    assert main(["demo", "--tiny", "--keep", "64", "--repeats", "2"]) == 0  # every pruner prunes
    assert "warning:" not in capsys.readouterr().out
    monkeypatch.setattr(demo, "paired_seconds", _fixed_times(unpruned_ms=10.0, pruned_ms=10.0))
    assert main(["demo", "--tiny", "--keep", "1.0", "--repeats", "2"]) == 0  # keep-all, no speed-up
    assert "warning:" not in capsys.readouterr().out


def test_tiny_demo_takes_a_fraction(capsys):
    assert main(["demo", "--tiny", "--keep", "0.25", "--repeats", "1"]) == 0
    line = next(row for row in capsys.readouterr().out.splitlines() if row.startswith("divprune "))
    assert line.split()[1] == "144"


needs_proxy = pytest.mark.skipif(
    not proxy.available(), reason=f"proxy packages not installed ({', '.join(proxy.missing())})"
)


@pytest.mark.slow
@needs_proxy
def test_default_demo_asks_an_easy_vqa_question_and_writes_the_overlay(capsys, tmp_path):
    from PIL import Image

    out_png = tmp_path / "demo.png"
    assert main(["demo", "--keep", "16", "--out", str(out_png), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "real-weights proxy" in out
    assert "question: 'what is the color of the shape?'" in out and "true answer: red" in out
    assert "note:" not in out  # the photo warning is for images the proxy was not trained on
    rows = {row.split()[0]: row.split() for row in out.splitlines() if row.split()}
    assert rows["(none)"][1:] == ["256", "red", "(right)"]  # the default is a question the unpruned proxy gets
    refused = dict(REFUSED.findall(out))
    assert list(refused) == ["mustdrop_merge"]  # its 3x3 windows leave at least 56 of 256
    answered = [name for name in vtprune.available() if name not in refused]
    for name in answered:
        assert rows[name][-1] in ("(right)", "(wrong)"), rows.get(name)
        if issubclass(vtprune.registry.pruner_class(name), vtprune.ScheduledPruner) or name == "mustdrop":
            assert 1 <= int(rows[name][1]) < 16, rows[name]  # keep is the mean per layer; fewer reach the end
        elif name in ENTERING:  # the same, and these may end with none
            assert 0 <= int(rows[name][1]) < 16, rows[name]
        elif name == "todre":  # 16 enter the LLM; in the last layers all or none, as the instruction decides
            assert rows[name][1] in ("0", "16"), rows[name]
        else:
            assert rows[name][1] == "16", rows[name]
    with Image.open(out_png) as sheet:
        assert sheet.width > (1 + len(answered)) * 224
        # the question and keep above, two title lines (name and count, answer), the legend below
        assert sheet.height >= 224 + 5 * 16


@pytest.mark.slow
@needs_proxy
def test_demo_on_a_photo_says_what_the_proxy_can_answer(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(vtprune, "available", lambda: ("cls",))
    assert main(["demo", "--image", "cat", "--out", str(tmp_path / "d.png"), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "note: the proxy was trained on easy-vqa only" in out and "circle" in out
    assert "question: 'What shape is in the image?'" in out
    assert "true answer" not in out and "(right)" not in out and "(wrong)" not in out


@needs_proxy
def test_true_answer_comes_from_the_data_set():
    from vtprune.__main__ import true_answer

    assert true_answer(0, "What is the color of the shape?") == "red"  # case and "?" do not matter
    assert true_answer(0, "what is the red shape") == "triangle"
    assert true_answer(0, "what colour is the sky?") is None
    assert true_answer(None, "what is the red shape?") is None


def test_verdict_judges_the_first_word_and_shortens_long_replies():
    from vtprune.__main__ import _verdict

    assert _verdict("Red.", "red") == "Red. (right)"
    assert _verdict("The shape is red", "red") == "The shape is red (wrong)"
    assert _verdict("The shape with the most information", "red", width=15) == "The shape... (wrong)"
    assert _verdict("circle", None) == "circle"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--keep", "0"], "--keep"),
        (["demo", "--image", "no-such-file.png"], "--image"),
        (["demo", "--question", "  "], "--question"),
        (["demo", "--out", "demo.jpg"], "--out"),
        (["demo", "--keep", "1.5"], "in (0, 1]"),
        (["demo", "--tiny", "--keep", "1000"], "--keep 1000: more than the 576 visual tokens"),
        (["demo", "--keep", "many"], "must be an int or a fraction"),
        (["demo", "--tiny", "--image", "cat"], "only apply to the proxy demo"),
        (["demo", "--repeats", "0"], "--repeats"),
        (["demo", "--image", __file__], "not an image file"),
        (["demo", "--image", "easy-vqa:1000"], "easy-vqa:0 to easy-vqa:999"),
        (["demo", "--image", "easy-vqa:first"], "easy-vqa:0 to easy-vqa:999"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and message in err
    assert len(err.strip().splitlines()) == 1, err  # one line, not argparse's usage block


@pytest.mark.slow  # a fresh Python process per case: seconds each
def test_bare_vtprune_prints_help_instead_of_starting_the_demo_and_knows_its_version():
    done = subprocess.run([sys.executable, "-m", "vtprune"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: vtprune" in done.stdout and "demo" in done.stdout
    assert "prefill" not in done.stdout  # nothing ran
    done = subprocess.run([sys.executable, "-m", "vtprune", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"vtprune {vtprune.__version__}"
