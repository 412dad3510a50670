"""`python -m vtprune demo` runs every pruner and reports what it kept (and, on the proxy, answered)."""

import subprocess
import sys

import pytest

import vtprune
from vtprune import proxy
from vtprune.__main__ import main


@pytest.mark.slow
def test_tiny_demo_prints_every_pruner(capsys):
    assert main(["demo", "--tiny", "--keep", "32", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "medians of 1 runs, unpruned and pruned alternately" in out
    for name in vtprune.available():
        line = next(row for row in out.splitlines() if row.startswith(name + " "))
        fields = line.split()
        assert fields[-1].endswith("x") and float(fields[-1][:-1]) > 0  # the speed-up column
        unpruned_ms, pruned_ms = float(fields[-3]), float(fields[-2])  # the unpruned prefill time is shown
        assert unpruned_ms > 0 and unpruned_ms / pruned_ms == pytest.approx(float(fields[-1][:-1]), rel=0.05)
        if issubclass(vtprune.registry.pruner_class(name), vtprune.ScheduledPruner):
            # keep is the mean per decoder layer; the tiny model's 4 layers leave few tokens at the end
            assert int(fields[1]) < 32 and "(576.." in line
        elif name == "fastv":
            assert fields[1] == "32" and "(576..32)" in line  # its first layers still see all 576
        else:
            assert fields[1] == "32" and fields[2] == "32"


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
    for name in vtprune.available():
        assert rows[name][-1] in ("(right)", "(wrong)"), rows.get(name)
        if issubclass(vtprune.registry.pruner_class(name), vtprune.ScheduledPruner):
            assert 1 <= int(rows[name][1]) < 16, rows[name]  # keep is the mean per layer; fewer reach the end
        elif name == "todre":  # 16 enter the LLM; in the last layers all or none, as the instruction decides
            assert rows[name][1] in ("0", "16"), rows[name]
        else:
            assert rows[name][1] == "16", rows[name]
    with Image.open(out_png) as sheet:
        assert sheet.width > (1 + len(vtprune.available())) * 224
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
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err


@pytest.mark.slow  # a fresh Python process per case: seconds each
def test_bare_vtprune_prints_help_instead_of_starting_the_demo_and_knows_its_version():
    done = subprocess.run([sys.executable, "-m", "vtprune"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: vtprune" in done.stdout and "demo" in done.stdout
    assert "prefill" not in done.stdout  # nothing ran
    done = subprocess.run([sys.executable, "-m", "vtprune", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"vtprune {vtprune.__version__}"
