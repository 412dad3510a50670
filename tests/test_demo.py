"""`python -m vtprune demo` runs every pruner and reports what it kept."""

import pytest

import vtprune
from vtprune.__main__ import main


@pytest.mark.slow
def test_demo_prints_every_pruner(capsys):
    assert main(["demo", "--keep", "32"]) == 0
    out = capsys.readouterr().out
    for name in vtprune.available():
        line = next(row for row in out.splitlines() if row.startswith(name + " "))
        assert line.split()[1] == "32"


def test_demo_rejects_bad_keep():
    with pytest.raises(SystemExit):
        main(["demo", "--keep", "0"])
