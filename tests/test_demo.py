"""`python -m vtprune demo` runs every pruner and reports what it kept (and, on the proxy, answered)."""

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


@pytest.mark.slow
@pytest.mark.skipif(not proxy.available(), reason=f"proxy packages not installed ({', '.join(proxy.missing())})")
def test_default_demo_answers_on_the_real_weights_proxy_and_writes_the_overlay(capsys, tmp_path):
    from PIL import Image

    out_png = tmp_path / "demo.png"
    assert main(["demo", "--keep", "16", "--image", "cat", "--out", str(out_png), "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "real-weights proxy" in out
    rows = {row.split()[0]: row.split() for row in out.splitlines() if row.split()}
    assert rows["(none)"][1] == "256" and len(rows["(none)"]) >= 3  # kept, an answer
    for name in vtprune.available():
        assert len(rows[name]) >= 4, rows.get(name)
        if issubclass(vtprune.registry.pruner_class(name), vtprune.ScheduledPruner):
            assert 1 <= int(rows[name][1]) < 16, rows[name]  # keep is the mean per layer; fewer reach the end
        else:
            assert rows[name][1] == "16", rows[name]
    with Image.open(out_png) as sheet:
        assert sheet.width > (1 + len(vtprune.available())) * 224


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--keep", "0"], "--keep"),
        (["demo", "--image", "no-such-file.png"], "--image"),
        (["demo", "--question", "  "], "--question"),
        (["demo", "--out", "demo.jpg"], "--out"),
        (["demo", "--keep", "1.5"], "in (0, 1]"),
        (["demo", "--keep", "many"], "must be an int or a fraction"),
        (["demo", "--tiny", "--image", "cat"], "only apply to the proxy demo"),
        (["demo", "--repeats", "0"], "--repeats"),
        (["demo", "--image", __file__], "not an image file"),
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
