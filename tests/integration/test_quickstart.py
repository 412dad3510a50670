"""The README's examples run as written: its first block on a tiny LLaVA, and the quickstart on a tiny
LLaVA saved in the llava-hf layout."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vtprune
from vtprune.testing import batch_inputs, make_prompt, save_tiny_llava_hf, tiny_llava

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_readme_shows_the_example_exactly():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text() in blocks, "README's quickstart block differs from examples/quickstart.py"


@pytest.mark.slow
def test_quickstart_runs_on_a_local_llava_hf_checkpoint(tmp_path):
    from PIL import Image

    checkpoint = save_tiny_llava_hf(tmp_path / "tiny-llava-hf")
    image = tmp_path / "photo.png"
    Image.new("RGB", (500, 375), "blue").save(image)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(
        [sys.executable, str(EXAMPLE), str(checkpoint), str(image)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert {"unpruned", "divprune, keep 64", "visual tokens kept", "unpruned again"} <= lines.keys()
    assert lines["visual tokens kept"].split()[0] == "64"
    assert lines["unpruned"] == lines["unpruned again"]


def test_the_readmes_first_example_runs_as_written_and_lists_the_pruners():
    readme = (ROOT / "README.md").read_text()
    first = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    shown = re.search(r"vtprune\.available\(\)  # (\[.*\])", first).group(1)
    assert ast.literal_eval(shown) == vtprune.available()
    model = tiny_llava(attn="sdpa")
    inputs = batch_inputs(model, [make_prompt(model, [1, 5], [8, 9, 10])])
    namespace = {"model": model, "inputs": inputs}
    exec(compile(first, "README.md", "exec"), namespace)  # the block as a user would paste it
    handle = vtprune.handle_of(model)
    assert isinstance(handle.pruner, vtprune.Pipeline)  # the block ends with a Pipeline applied
    assert namespace["handle"].last is not None and not namespace["handle"].active
