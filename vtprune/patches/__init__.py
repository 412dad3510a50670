"""Model-family adapters: the only code that knows model classes."""

from __future__ import annotations

from vtprune.patches import llava

_FAMILIES = (llava,)


def supported_classes() -> list[str]:
    return [name for family in _FAMILIES for name in family.SUPPORTED]


def adapter_for(model):
    for family in _FAMILIES:
        if family.supports(model):
            return family.LlavaAdapter(model)
    raise TypeError(
        f"vtprune does not support {type(model).__name__}; supported model classes: {', '.join(supported_classes())}"
    )
