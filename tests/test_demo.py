"""`python -m vtprune demo` runs every pruner and reports what it kept (and, on the proxy, answered)."""

import pytest

import vtprune
from vtprune import proxy
from vtprune.__main__ import main


@pytest.mark.slow
def test_tiny_demo_prints_every_pruner(capsys):
    assert main(["demo", "--tiny", "--keep", "32"]) == 0
    out = capsys.readouterr().out
    for name in vtprune.available():
        line = next(row for row in out.splitlines() if row.startswith(name + " "))
        if issubclass(vtprune.registry.pruner_class(name), vtprune.ScheduledPruner):
            # keep is the mean per decoder layer; the tiny model's 4 layers leave few tokens at the end
            per_layer = [int(t) for t in line.split()[2].split(",")]
            assert len(per_layer) == 4 and int(line.split()[1]) == per_layer[-1] < 32
        else:
            assert line.split()[1] == "32"


@pytest.mark.slow
@pytest.mark.skipif(not proxy.available(), reason=f"proxy packages not installed ({', '.join(proxy.missing())})")
def test_default_demo_answers_on_the_real_weights_proxy_and_writes_the_overlay(capsys, tmp_path):
    from PIL import Image

    out_png = tmp_path / "demo.png"
    assert main(["demo", "--keep", "16", "--image", "cat", "--out", str(out_png)]) == 0
    out = capsys.readouterr().out
    assert "real-weights proxy" in out
    rows = {row.split()[0]: row.split() for row in out.splitlines() if row.split()}
    assert rows["(none)"][1] == "256" and len(rows["(none)"]) >= 4  # kept, prefill ms, an answer
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
    ],
)
def test_demo_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
