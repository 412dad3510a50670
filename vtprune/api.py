"""``vtprune.apply``: the one verb."""

from __future__ import annotations

import dataclasses

from vtprune.handle import HANDLE_ATTR, PruneHandle
from vtprune.patches import adapter_for
from vtprune.pruners.base import Pruner
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import pruner_class


def make_pruner(pruner, **options) -> Pruner | Pipeline:
    """A pruner config from a registry name and options, the config object itself, or a Pipeline
    from a list of config objects."""
    if isinstance(pruner, (list, tuple)):
        if options:
            raise TypeError(f"options {sorted(options)} given with a list of pruners; set them on each pruner object")
        return Pipeline(list(pruner))
    if isinstance(pruner, (Pruner, Pipeline)):
        if options:
            raise TypeError(f"options {sorted(options)} given with a pruner object; set them on the object instead")
        return pruner
    cls = pruner_class(pruner)
    try:
        return cls(**options)
    except TypeError as exc:
        fields = [f.name for f in dataclasses.fields(cls) if f.init]  # not class constants (name, stage, ...)
        raise TypeError(f"bad options for pruner {pruner!r}: {exc}; it takes {', '.join(fields)}") from None


def _uncompiled(model):
    """The module behind ``torch.compile(model)``: the compiled wrapper calls its (patched) forward."""
    return getattr(model, "_orig_mod", model) if type(model).__name__ == "OptimizedModule" else model


def handle_of(model) -> PruneHandle | None:
    """The active handle of ``model`` (or of the module ``torch.compile`` wrapped), or None."""
    return getattr(_uncompiled(model), HANDLE_ATTR, None)


def apply(model, pruner, **options) -> PruneHandle:
    """Prune visual tokens of ``model`` until the returned handle's ``remove()``.

    Args:
        model: a supported model (``vtprune.supported_classes()``: LLaVA-1.5, LLaVA-NeXT,
            LLaVA-NeXT-Video, LLaVA-OneVision, Qwen2-VL and Qwen2.5-VL classes, or subclasses),
            unmodified, any attention implementation; images, videos, or both in one prompt.
        pruner: a name from ``vtprune.available()``, a pruner object such as ``vtprune.DivPrune(keep=64)``,
            or a ``vtprune.Pipeline`` (or a list) of pruner objects: one vision-stage pruner, then
            LLM-stage pruners.
        **options: the pruner's options when ``pruner`` is a name, e.g. ``keep=64``, ``layer=2`` or
            ``budget="per_video"``.

    Returns:
        A handle: ``handle.last`` describes the last pruned forward, ``handle.remove()`` (or leaving a
        ``with`` block) restores the model exactly.

    Raises:
        TypeError: arguments of the wrong kind (options given with a pruner object, an unknown option),
            or a model class vtprune does not support.
        ValueError: an option out of its range or of the wrong type, a pruner this model cannot run
            (e.g. a layer beyond its decoder), or a model that already has vtprune applied.
        NotImplementedError: raised later, by a forward or ``generate()``, for a mode a pruner refuses
            (each message names the mode; see the README's limits).

    Everything is validated before the model is touched. A model compiled with ``torch.compile(model)``
    is pruned through the module it wraps; ``copy.deepcopy`` of a pruned model is pruned the same way,
    independently (its handle: ``vtprune.handle_of(copy)``).
    """
    config = make_pruner(pruner, **options)
    model = _uncompiled(model)
    existing = getattr(model, HANDLE_ATTR, None)
    if existing is not None:
        raise ValueError(
            f"this model already has vtprune applied ({existing.pruner.name}); call .remove() on that handle first"
        )
    adapter = adapter_for(model)
    adapter.check(config)
    undo = adapter.install(config)
    return PruneHandle(model, config, adapter, undo)
