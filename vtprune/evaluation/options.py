"""``--model_args`` of the lmms-eval model, split and checked before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from vtprune.api import make_pruner
from vtprune.registry import available

NO_PRUNER = "none"
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class HarnessOptions:
    """What ``pretrained=PATH,pruner=divprune,keep=64,...`` asks for.

    pruner: a name from ``vtprune.available()`` or ``"none"`` (the unpruned model).
    pruner_options: every other key not listed here, passed to the pruner (``keep``, ``layer``, ...).
    batch_size: requests per forward (lmms-eval's ``--batch_size``, a string on the command line).
    max_new_tokens: the default when a task's generation kwargs name none.
    """

    pretrained: str
    pruner: str = NO_PRUNER
    pruner_options: dict = field(default_factory=dict)
    device: str | None = None
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    batch_size: int = 1
    max_new_tokens: int = 128

    def pruner_config(self):
        """The pruner object (None for ``"none"``); raises vtprune's own error for bad options."""
        if self.pruner == NO_PRUNER:
            return None
        return make_pruner(self.pruner, **self.pruner_options)


def _positive_int(name: str, value) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or isinstance(value, bool) or number < 1 or str(number) != str(value).strip():
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def parse_model_args(pretrained=None, pruner=NO_PRUNER, **kwargs) -> HarnessOptions:
    """Check the model arguments lmms-eval passes (already split at commas and typed by its parser)
    and return them; every error names the argument and what is allowed. Nothing is loaded here."""
    if pretrained in (None, ""):
        raise ValueError("model_args must include pretrained=PATH (a local model directory or Hub id)")
    if not isinstance(pruner, str) or (pruner != NO_PRUNER and pruner not in available()):
        raise ValueError(f"unknown pruner {pruner!r}; use one of: {NO_PRUNER}, {', '.join(available())}")
    options = {}
    for name in ("device", "dtype", "attn_implementation"):
        if kwargs.get(name) is not None:
            options[name] = str(kwargs.pop(name))
        else:
            kwargs.pop(name, None)
    if options.get("attn_implementation", "sdpa") not in ATTENTION:
        raise ValueError(
            f"attn_implementation must be one of {', '.join(ATTENTION)}, got {options['attn_implementation']!r}"
        )
    batch_size = kwargs.pop("batch_size", 1)
    if isinstance(batch_size, str) and batch_size.startswith("auto"):
        raise ValueError("batch_size=auto is not supported; give a number of requests per forward")
    kwargs.pop("max_batch_size", None)  # lmms-eval passes it; only meaningful with "auto"
    max_new_tokens = _positive_int("max_new_tokens", kwargs.pop("max_new_tokens", 128))
    harness = HarnessOptions(
        pretrained=str(pretrained),
        pruner=pruner,
        pruner_options=kwargs,
        batch_size=_positive_int("batch_size", batch_size),
        max_new_tokens=max_new_tokens,
        **options,
    )
    if pruner == NO_PRUNER and kwargs:
        raise ValueError(f"pruner=none takes no pruner options, got {', '.join(sorted(kwargs))}")
    harness.pruner_config()  # validate now, before the model loads
    return harness
