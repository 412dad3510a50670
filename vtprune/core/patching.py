"""Instance-level method patches and per-thread call state that survive ``copy.deepcopy`` of a model.

Patches are objects, never closures: ``copy.deepcopy(model)`` copies a patch together with the model,
the adapter it calls into and the original method it wraps (a closure would be shared, and the copy
would silently run the original model's weights). Undoing a patch finds it wherever it now sits:
accelerate's hooks move the instance's ``forward`` into ``_old_forward`` when they wrap it.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from contextlib import contextmanager

# Attributes where other libraries keep the method they wrapped, so a patch may have been moved there.
_MOVED_TO = ("_old_{}",)  # accelerate.hooks.add_hook_to_module


class MethodPatch:
    """Shadows ``obj.<name>`` with ``replacement(original, *args, **kwargs)``; ``undo()`` restores it.

    The patch looks like the method it replaces (``functools.update_wrapper``), so callers that read
    its signature, such as ``generate()`` reading ``get_image_features``'s, see the original one.
    ``replacement`` must be a bound method (deep-copied with its object), not a closure.
    """

    def __init__(self, obj, name: str, replacement: Callable):
        self.obj = obj
        self.name = name
        self.had_own = name in obj.__dict__
        self.original = getattr(obj, name)
        self.replacement = replacement
        # Name, docs and __wrapped__ (which inspect.signature follows); not annotations, which may not pickle.
        functools.update_wrapper(
            self, self.original, assigned=("__module__", "__name__", "__qualname__", "__doc__"), updated=()
        )
        obj.__dict__[name] = self

    def __call__(self, *args, **kwargs):
        return self.replacement(self.original, *args, **kwargs)

    def undo(self) -> None:
        d = self.obj.__dict__
        if d.get(self.name) is self:
            if self.had_own:
                d[self.name] = self.original
            else:
                del d[self.name]
            return
        for slot in (template.format(self.name) for template in _MOVED_TO):
            if d.get(slot) is self:
                # The wrapper calls ``slot``; it then calls what vtprune found, as if never patched.
                d[slot] = self.original
                return
        raise RuntimeError(
            f"vtprune's patch of {type(self.obj).__name__}.{self.name} is no longer on the model: something "
            f"replaced {self.name!r} after vtprune.apply() without keeping vtprune's version in "
            f"{', '.join(t.format(self.name) for t in _MOVED_TO)}; restore that wrapper's original first"
        )


class PerThread:
    """A value per thread (one model can serve several threads); the state of calls in flight.

    Unlike ``threading.local`` it can be deep-copied: the copy starts with no calls in flight.
    """

    def __init__(self):
        self._values: dict[int, object] = {}

    def get(self):
        return self._values.get(threading.get_ident())

    @contextmanager
    def set(self, value):
        key = threading.get_ident()
        previous = self._values.get(key)
        self._values[key] = value
        try:
            yield value
        finally:
            if previous is None:
                self._values.pop(key, None)
            else:
                self._values[key] = previous

    def __deepcopy__(self, memo) -> PerThread:
        return PerThread()
