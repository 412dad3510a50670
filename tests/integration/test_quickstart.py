"""The README's end-to-end example runs as written, on a tiny LLaVA saved in the llava-hf layout."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vtprune.testing import save_tiny_llava_hf

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
