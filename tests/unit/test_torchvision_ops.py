"""The start-up hook that lets a CUDA torchvision import beside a CPU torch (vLLM's CPU environment):
where torchvision's operators load (here) it changes nothing; the hook it installs is self-contained."""

import ast
import subprocess
import sys

from vtprune.serving import torchvision_ops


def test_nothing_is_declared_where_torchvision_loads():
    import torchvision  # noqa: F401  (this environment's torchvision matches its torch)

    assert torchvision_ops.declare_missing_operators() == []


def test_the_hook_is_one_module_and_a_pth_line(tmp_path):
    module, pth = torchvision_ops.install(tmp_path)
    assert pth.read_text() == "import _vtprune_torchvision_ops; _vtprune_torchvision_ops.startup()\n"
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(module.read_text()))
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    # Imported at every interpreter start-up: the standard library only (torch when torchvision comes).
    assert imported <= {"__future__", "importlib", "shutil", "sys", "sysconfig", "pathlib", "torch"}


def test_startup_arms_the_hook_once_and_it_steps_aside(tmp_path):
    torchvision_ops.install(tmp_path)
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import _vtprune_torchvision_ops as h; "
        "h.startup(); h.startup(); armed = sum(isinstance(f, h._BeforeTorchvision) for f in sys.meta_path); "
        "import torchvision; left = sum(isinstance(f, h._BeforeTorchvision) for f in sys.meta_path); "
        "print(armed, left)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["1", "0"]
