"""Every script's ``--help`` runs and shows its whole description (not one cut-off line)."""

import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))


def _first_paragraph(script: Path) -> str:
    import ast

    doc = ast.get_docstring(ast.parse(script.read_text()))
    assert doc, f"{script.name} has no docstring"
    return " ".join(doc.split("\n\n")[0].split())


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_help_shows_the_whole_description(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert _first_paragraph(script) in shown
