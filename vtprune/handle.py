"""The object ``vtprune.apply`` returns: inspect what was pruned, undo everything."""

from __future__ import annotations

from collections.abc import Callable

from vtprune.core.stats import PruneStats
from vtprune.pruners.base import Pruner

HANDLE_ATTR = "_vtprune_handle"


class PruneHandle:
    """Live pruning on one model. ``remove()`` (or leaving the ``with`` block) restores the model exactly."""

    def __init__(self, model, pruner: Pruner, adapter, undo: list[Callable[[], None]]):
        self.model = model
        self.pruner = pruner
        self._adapter = adapter
        self._undo = undo
        setattr(model, HANDLE_ATTR, self)

    @property
    def active(self) -> bool:
        return self._adapter is not None

    @property
    def last(self) -> PruneStats | None:
        """What the most recent forward that carried images kept (None before the first one)."""
        return self._adapter.last if self._adapter is not None else self._last_after_remove

    def remove(self) -> None:
        """Remove every hook and patched method; calling it twice is harmless."""
        if self._adapter is None:
            return
        self._last_after_remove = self._adapter.last
        errors = []
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # keep undoing the rest; report after
                errors.append(exc)
        self.model.__dict__.pop(HANDLE_ATTR, None)
        self._adapter = None
        self._undo = []
        if errors:
            raise RuntimeError(f"vtprune: {len(errors)} step(s) of remove() failed: {errors}")

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle({self.pruner!r}, {state})"
