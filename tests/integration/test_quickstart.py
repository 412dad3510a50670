"""The README's examples run as written: its first block on a tiny LLaVA, and the quickstart on a tiny
LLaVA saved in the llava-hf layout (the README's offline path), with its device/dtype options, and
offline on its default Hub id (one line, exit 2)."""

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vtprune
from vtprune import proxy
from vtprune.testing import batch_inputs, make_prompt, save_tiny_llava_hf, tiny_llava

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "quickstart.py"


def test_readme_shows_the_example_exactly():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text() in blocks, "README's quickstart block differs from examples/quickstart.py"


def run_quickstart(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # as on a machine without the Hub
    return subprocess.run(
        [sys.executable, str(EXAMPLE), *args], capture_output=True, text=True, env=env, timeout=600, check=False
    )


@pytest.mark.slow
def test_the_readmes_offline_path_runs_the_quickstart_with_cpu_defaults(tmp_path):
    """`vtprune checkpoint tiny DIR` (the README's offline path, minus the proxy's real weights), then the
    quickstart on it: on this CPU-only machine the defaults are the CPU and float32."""
    from PIL import Image

    made = subprocess.run(
        [sys.executable, "-m", "vtprune", "checkpoint", "tiny", str(tmp_path / "ckpt")], capture_output=True, text=True
    )
    assert made.returncode == 0 and (tmp_path / "ckpt" / "config.json").is_file(), made.stderr
    image = tmp_path / "photo.png"
    Image.new("RGB", (500, 375), "blue").save(image)
    out = run_quickstart(str(tmp_path / "ckpt"), str(image))
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert {"model", "unpruned", "divprune, keep 64", "visual tokens kept", "unpruned again"} <= lines.keys()
    assert lines["model"].strip() == f"{tmp_path / 'ckpt'} on cpu in float32"
    assert lines["visual tokens kept"].split()[0] == "64"
    assert lines["unpruned"] == lines["unpruned again"]


@pytest.mark.slow
@pytest.mark.skipif(not proxy.available(), reason="the proxy extra is not installed")
def test_the_readmes_offline_path_with_real_weights(tmp_path):
    """The README's two commands verbatim: `vtprune checkpoint proxy DIR`, then the quickstart on DIR."""
    made = subprocess.run(
        [sys.executable, "-m", "vtprune", "checkpoint", "proxy", str(tmp_path / "proxy")],
        capture_output=True,
        text=True,
    )
    assert made.returncode == 0, made.stderr
    out = run_quickstart(str(tmp_path / "proxy"))
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(":", 1) for line in out.stdout.splitlines() if ":" in line)
    assert lines["visual tokens kept"].split()[0] == "64"  # of the proxy's 256
    assert lines["unpruned"] == lines["unpruned again"] and lines["unpruned"].strip()


@pytest.mark.slow
def test_quickstart_takes_device_and_dtype(tmp_path):
    checkpoint = save_tiny_llava_hf(tmp_path / "tiny-llava-hf")
    out = run_quickstart(str(checkpoint), "--device", "cpu", "--dtype", "bfloat16")
    assert out.returncode == 0, out.stderr
    assert f"model: {checkpoint} on cpu in bfloat16" in out.stdout and "visual tokens kept: 64" in out.stdout


@pytest.mark.slow
def test_quickstart_without_the_hub_says_how_to_run_offline_in_one_line():
    out = run_quickstart()  # the default, llava-hf/llava-1.5-7b-hf, cannot be fetched here
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    (line,) = [line for line in out.stderr.splitlines() if line.strip()]
    assert line.startswith("cannot load 'llava-hf/llava-1.5-7b-hf'") and "vtprune checkpoint proxy DIR" in line


@pytest.mark.slow
def test_checkpoint_command_refuses_a_file_and_names_the_kinds(tmp_path):
    (tmp_path / "file").write_text("")
    for args, message in (
        (["tiny", str(tmp_path / "file")], "is a file"),
        (["big", "x"], "choose from 'proxy', 'tiny'"),
    ):
        done = subprocess.run([sys.executable, "-m", "vtprune", "checkpoint", *args], capture_output=True, text=True)
        assert done.returncode == 2 and message in done.stderr and len(done.stderr.strip().splitlines()) == 1


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
