"""Name -> pruner class registry behind ``vtprune.apply(model, "name", ...)``."""

from __future__ import annotations

_PRUNERS: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a pruner available under its ``name``."""
    if cls.name in _PRUNERS:
        raise ValueError(f"a pruner named {cls.name!r} is already registered")
    _PRUNERS[cls.name] = cls
    return cls


def available() -> list[str]:
    """Names accepted by ``vtprune.apply``, sorted."""
    return sorted(_PRUNERS)


def pruner_class(name: str) -> type:
    if not isinstance(name, str) or name not in _PRUNERS:
        raise ValueError(f"unknown pruner {name!r}; available: {', '.join(available())}")
    return _PRUNERS[name]
