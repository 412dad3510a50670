"""The shell commands shown in the README and docs/ name files, options and extras that exist.

Every ``bash`` block is read line by line (continuations joined, comments dropped). A command that runs
a script of this repository (``python scripts/x.py``, ``python examples/x.py``) needs that file, and
each ``--option`` it passes must be one the script defines; so must the options of ``vtprune <command>``;
a ``pip install -e ".[extras]"`` needs those extras (as installed from pyproject.toml); any path of this repository
on the line (``eval/...``, ``docs/...``) must exist, except the outputs the docs say a command writes.
"""

from __future__ import annotations

import importlib.metadata
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
BASH_BLOCK = re.compile(r"```bash\n(.*?)```", re.S)
# `vtprune <command>` -> the module defining its options (eval forwards its options to lmms-eval)
SUBCOMMANDS = {
    "demo": "vtprune/__main__.py",
    "profile": "vtprune/profiling/cli.py",
    "checkpoint": "vtprune/checkpoint_cli.py",
    "calibrate": "vtprune/calibration.py",
    "eval": None,
}
REPO_DIRS = ("scripts/", "examples/", "eval/", "docs/", "tests/", "vtprune/")
# Written by the commands shown next to them (gitignored outputs), not files of the repository.
OUTPUTS = ("eval/runs/",)


def commands() -> list[tuple[str, str]]:
    """(page name, one shell command) for every command line of every bash block."""
    found = []
    for page in PAGES:
        for block in BASH_BLOCK.findall(page.read_text()):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"(^|\s)#.*$", "", line).strip()
                for command in re.split(r"\s*(?:&&|\|\||;|\|)\s*", line):
                    if command:
                        found.append((page.relative_to(ROOT).as_posix(), command))
    return found


COMMANDS = commands()


def _words(command: str) -> list[str]:
    return shlex.split(command)


def _options(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def _defines(source: Path, option: str) -> bool:
    return f'"{option}"' in source.read_text()


def test_the_pages_show_commands():
    pages = {page for page, _ in COMMANDS}
    assert {"README.md", "docs/evaluation.md", "docs/profiling.md", "docs/install.md"} <= pages
    assert len(COMMANDS) > 30


@pytest.mark.parametrize(("page", "command"), COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_command_names_what_exists(page, command):
    words = _words(command)
    if words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
        script = ROOT / words[1]
        assert script.is_file(), f"{page}: {words[1]} does not exist"
        missing = [o for o in _options(words[2:]) if not _defines(script, o)]
        assert not missing, f"{page}: {words[1]} defines no {missing}"
    program = words[2:] if words[:3] == ["python", "-m", "vtprune"] else words[1:] if words[:1] == ["vtprune"] else None
    if program is not None and program:
        assert program[0] in SUBCOMMANDS, f"{page}: vtprune has no command {program[0]!r}"
        if SUBCOMMANDS[program[0]]:
            source = ROOT / SUBCOMMANDS[program[0]]
            missing = [o for o in _options(program[1:]) if not _defines(source, o)]
            assert not missing, f"{page}: vtprune {program[0]} defines no {missing}"
    if words[:2] == ["pip", "install"]:
        extras = importlib.metadata.metadata("vtprune").get_all("Provides-Extra")
        for target in words:
            wanted = re.fullmatch(r"\.\[([\w,]+)\]", target)
            if wanted:
                unknown = set(wanted.group(1).split(",")) - set(extras)
                assert not unknown, f"{page}: no extra {unknown} in pyproject.toml"
    for word in words:
        path = word.split("=")[-1]
        if path.startswith(REPO_DIRS) and not path.startswith(OUTPUTS):
            assert (ROOT / path).exists(), f"{page}: {path} does not exist"


def test_the_checker_catches_what_it_should(tmp_path):
    """The checks above fail on a wrong script, option, command and extra (they are not vacuous)."""
    for bad in (
        "python scripts/no_such_script.py",
        "python scripts/sweep.py eval/sweeps/proxy.yaml --no-such-option",
        "vtprune profile --model tiny --no-such-option 3",
        "vtprune serve",
        'pip install -e ".[no_such_extra]" -c constraints.txt',
        "python scripts/sweep.py eval/sweeps/no_such.yaml",
    ):
        with pytest.raises(AssertionError):
            test_command_names_what_exists("README.md", bad)


def _sample(page: str, after: str) -> list[str]:
    """The lines of the first code block without a language after the text ``after`` on ``page``."""
    text = (ROOT / page).read_text()
    lines, inside, block = text[text.index(after) :].splitlines(), None, []
    for line in lines:
        if inside is None and line.startswith("```"):
            inside = line[3:].strip()  # the block's language ("" for plain output)
        elif inside is not None and line.startswith("```"):
            if inside == "":
                return block
            inside, block = None, []
        elif inside == "":
            block.append(line)
    raise AssertionError(f"{page}: no plain code block after {after!r}")


def test_the_demo_output_shown_is_the_current_one():
    import vtprune
    from vtprune.__main__ import NAME, TIME_COLUMNS

    assert NAME >= max(len(name) for name in vtprune.available())  # the pruner column fits every name
    lines = _sample("docs/demo.md", "on the 2-core CPU machine")
    header = next(line for line in lines if line.startswith("pruner"))
    assert header == f"{'pruner':<{NAME}} {'kept':>8} {'per decoder layer':<20} {TIME_COLUMNS}  answer"
    rows = [line for line in lines[lines.index(header) + 1 :] if not line.startswith(("warning:", "overlay of"))]
    names = [row.split()[0] for row in rows]
    assert names == ["(none)", *vtprune.available()]


@pytest.mark.parametrize("after", ["On the [real-weights proxy]", "### Multi-stage pruners over a 128-token"])
def test_the_profile_output_shown_is_the_current_one(after):
    import vtprune
    from vtprune.profiling.cli import table

    lines = _sample("docs/profiling.md", after)
    assert lines[1].split() == table([]).split()  # the column titles, as printed now
    assert "medians of 5 runs per row after 1 warm-up run;" in lines[0]
    assert {line.split()[0] for line in lines[2:]} <= {"none", *vtprune.available()}
