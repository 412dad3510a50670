"""Backend switch shared by every op: ``"torch"`` (the readable reference), ``"triton"`` or ``"auto"``."""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """True when Triton is installed (checked without importing it: importing costs seconds)."""
    try:
        return importlib.util.find_spec("triton") is not None
    except ValueError:  # sys.modules["triton"] is None: imports of it are blocked
        return False


def triton_interpreted() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``), as in the tests."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def check_backend(backend) -> None:
    """Raise ValueError unless ``backend`` is one of ``BACKENDS``."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The implementation that will run for ``backend`` on ``tensors``: ``"torch"`` or ``"triton"``.

    ``auto`` picks Triton for CUDA tensors when Triton is installed and torch otherwise. An explicit
    ``triton`` on CPU tensors is allowed only under Triton's interpreter, which is how the kernels are
    tested on machines without a GPU.
    """
    check_backend(backend)
    on_cuda = all(t.is_cuda for t in tensors)
    if backend == "auto":
        return "triton" if on_cuda and triton_available() and not triton_interpreted() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ImportError("backend='triton' needs the `triton` package; install it or use backend='torch'")
        if not on_cuda and not triton_interpreted():
            devices = sorted({str(t.device) for t in tensors})
            raise ValueError(
                f"backend='triton' needs CUDA tensors (got {', '.join(devices)}); set TRITON_INTERPRET=1 "
                "before the first kernel call to run the kernels in Triton's CPU interpreter, or use backend='torch'"
            )
    return backend
