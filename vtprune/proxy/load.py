"""``load_proxy``: the real-weights proxy LLaVA, built from the packages once and cached on disk.

Cache layout (``$VTPRUNE_CACHE/proxy`` or ``~/.cache/vtprune/proxy``, or ``cache_dir``)::

    <cache>/llava-v1/   the assembled model (untrained projector) + processor, ~600 MB float32
    <cache>/features/   tower features of easy-vqa images, written by scripts/train_proxy.py

The trained projector is not part of the cache: it is read on every load from ``projector.safetensors``
next to this file (committed with the package), so a new projector needs no rebuild.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

from vtprune.proxy import packages

PROJECTOR_FILE = Path(__file__).with_name("projector.safetensors")
CACHE_VERSION = "llava-v1"  # bump when the assembly changes, so stale caches are rebuilt
_DONE = "vtprune_proxy_ok"  # written last: a cache without it is incomplete and is rebuilt


def default_cache_dir() -> Path:
    """``$VTPRUNE_CACHE/proxy`` when the variable is set, else ``~/.cache/vtprune/proxy``."""
    root = os.environ.get("VTPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "vtprune") / "proxy"


def _resolve_cache(cache_dir) -> Path:
    if cache_dir is None:
        return default_cache_dir()
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a path or None, got {type(cache_dir).__name__}")
    return Path(cache_dir)


def build_proxy(target: str | Path, verbose: bool = False) -> None:
    """Convert the tower (ONNX) and LLM (GGUF), assemble them and save model + processor to ``target``."""
    from vtprune.proxy.assemble import build_llava, build_processor
    from vtprune.proxy.language import convert_language_model
    from vtprune.proxy.tower import convert_tower

    if not packages.available():
        raise ModuleNotFoundError(f"proxy packages missing: {', '.join(packages.missing())}; {packages.INSTALL_HINT}")
    start = time.perf_counter()
    tower = convert_tower()
    language_model, tokenizer = convert_language_model()
    processor = build_processor(tokenizer)
    model = build_llava(tower, language_model, processor.image_token_id, len(processor.tokenizer))
    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    (target / _DONE).unlink(missing_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    (target / _DONE).write_text("ok\n")
    if verbose:
        print(f"built the proxy in {time.perf_counter() - start:.0f} s -> {target}")


def load_projector(model, path: str | Path) -> None:
    """Load projector weights (``linear_1.*``, ``linear_2.*`` safetensors) into ``model`` in place."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"projector file not found: {path}")
    model.model.multi_modal_projector.load_state_dict(load_file(str(path)), strict=True)


def save_projector(model, path: str | Path) -> None:
    """Save ``model``'s projector weights as safetensors (float32, contiguous)."""
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))


def load_proxy(cache_dir: str | Path | None = None, projector: str | Path | None = "default", verbose: bool = False):
    """(``LlavaForConditionalGeneration`` float32 in eval mode, ``LlavaProcessor``) with real weights.

    Args:
        cache_dir: where the assembled model is cached (default: ``default_cache_dir()``). The first
            call builds it from the installed packages (about a minute), later calls load it (seconds).
        projector: ``"default"`` for the trained projector shipped with vtprune (with a warning and an
            untrained projector when the file is absent), a path to a projector safetensors file, or
            None for the untrained (seed 0) projector.
        verbose: print what is being built.
    """
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    if projector is not None and not isinstance(projector, (str, os.PathLike)):
        raise TypeError(f"projector must be 'default', a path or None, got {type(projector).__name__}")
    target = _resolve_cache(cache_dir) / CACHE_VERSION
    if not (target / _DONE).is_file():
        build_proxy(target, verbose=verbose)
    model = LlavaForConditionalGeneration.from_pretrained(target, dtype="float32").eval()
    processor = LlavaProcessor.from_pretrained(target)
    if projector == "default":
        if PROJECTOR_FILE.is_file():
            load_projector(model, PROJECTOR_FILE)
        else:
            warnings.warn(f"no trained projector at {PROJECTOR_FILE}; the proxy's projector is untrained", stacklevel=2)
    elif projector is not None:
        load_projector(model, projector)
    return model, processor


def export_proxy(
    target: str | Path, cache_dir: str | Path | None = None, projector: str | Path | None = "default"
) -> Path:
    """Save the proxy *with its trained projector* (or ``projector`` as in ``load_proxy``) as a plain
    llava-hf checkpoint in ``target`` (model + processor, float32), which anything taking a model
    directory loads: ``LlavaForConditionalGeneration.from_pretrained``, lmms-eval's
    ``--model vtprune --model_args pretrained=<target>``, ``vtprune profile --model <target>``."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"target must be a directory, got the file {target}")
    model, processor = load_proxy(cache_dir, projector=projector)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return target
