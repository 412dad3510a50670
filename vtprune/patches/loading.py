"""Load a supported model and its processor from a local directory (or Hub id), the family read from
its config: the harness and the profiler take a path, not a class."""

from __future__ import annotations

import os
from pathlib import Path

from vtprune.patches import supported_classes


def model_class_for(config):
    """The transformers class for ``config`` (``config.model_type`` through transformers' own
    image-text-to-text mapping); a ValueError naming the supported types when vtprune has no adapter."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as names

    supported = [t for t, name in names.items() if name in supported_classes()]
    model_type = getattr(config, "model_type", None)
    if model_type not in supported:
        raise ValueError(f"vtprune cannot prune model_type {model_type!r}; supported: {', '.join(sorted(supported))}")
    return getattr(transformers, names[model_type])


def check_model_path(path) -> str:
    """``path`` as a string; a FileNotFoundError when it looks local (exists, or starts with
    ``.``/``/``/``~``) but has no ``config.json``. Anything else is a Hub id, which transformers loads
    from its cache when offline (or fails with an ``OSError`` saying it could not)."""
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"pretrained must be a model directory or Hub id, got {path!r}")
    path = str(path)
    local = Path(path).expanduser()
    looks_local = path.startswith((".", "/", "~")) or local.exists()
    if looks_local and not (local / "config.json").is_file():
        raise FileNotFoundError(f"no model at {path!r}: expected a directory with config.json (save_pretrained output)")
    return str(local) if local.exists() else path


def load_model(path, *, dtype="auto", attn_implementation: str | None = "sdpa", device="cpu"):
    """(model in eval mode on ``device``, processor) from ``path``; the model class from its config."""
    import torch
    from transformers import AutoConfig, AutoProcessor

    path = check_model_path(path)
    config = AutoConfig.from_pretrained(path)
    model_class = model_class_for(config)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"dtype must be 'auto' or a torch dtype name such as 'float16', got {dtype!r}")
        dtype = getattr(torch, dtype)
    model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(path)
    return model.to(device).eval(), processor
