"""What ``generate()`` knows and the forward does not: where the prompt ends, and how long a pruned
cache is in the units of ``input_ids``.

``generate()`` feeds the model forwards that are not just "the prompt": assisted decoding's first
forward holds the prompt plus the assistant's candidate tokens, and ``use_cache=False`` re-runs the
whole sequence at every step. Pruners that score with the last prompt token read its position here.
``Generation`` holds the bodies of the ``generate()`` and ``prepare_inputs_for_generation`` patches
and maps decode steps onto a cache the vision stage shortened.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from vtprune.core.cache_state import CacheState
from vtprune.core.patching import PerThread


@dataclass
class GenerateCall:
    """One ``generate()`` call in flight."""

    prompt_length: int  # tokens in the prompt given to generate() (input_ids or inputs_embeds)
    kept: tuple | None = None  # the LLM stage's choices at the first forward, reused by later full forwards


def prompt_length(arguments: dict) -> int | None:
    """Length of the prompt in ``generate()``'s bound arguments, if it has one."""
    for name in ("inputs", "input_ids", "inputs_embeds"):
        value = arguments.get(name)
        if value is None:
            value = arguments.get("kwargs", {}).get(name)
        if value is not None and hasattr(value, "shape") and value.dim() >= 2:
            return int(value.shape[1])
    return None


def continuation_length(next_sequence_length: int | None, input_ids, cache, shrink: int) -> int | None:
    """``next_sequence_length`` for a prompt that continues a cache a pruned prefill shortened.

    ``generate()`` slices the new tokens off ``input_ids`` (original units) by the cache's length
    (shortened units); the cache stands for ``shrink`` more original tokens than it holds.
    """
    if next_sequence_length is None or shrink <= 0 or cache is None:
        return next_sequence_length
    if next_sequence_length != input_ids.shape[1] - cache.get_seq_length():
        return next_sequence_length  # a decode step, not a slice derived from the cache length
    return next_sequence_length - shrink


def is_static(cache) -> bool:
    """Caches with fixed slots (``cache_implementation="static"``, ``StaticCache``)."""
    return bool(getattr(cache, "is_compileable", False))


class Generation:
    """The ``generate()`` call in flight in each thread, and per cache how a pruned prefill shortened
    it (``DecodeTranslation``, stored by the vision stage's caller)."""

    def __init__(self):
        self.calls = PerThread()  # GenerateCall of the generate() running in this thread
        self.decode = CacheState("decode")

    def current(self) -> GenerateCall | None:
        return self.calls.get()

    def generate(self, original, *args, **kwargs):
        """The patched ``model.generate``: records where the prompt ends."""
        length = prompt_length(inspect.signature(original).bind_partial(*args, **kwargs).arguments)
        if length is None:
            return original(*args, **kwargs)
        with self.calls.set(GenerateCall(prompt_length=length)):
            return original(*args, **kwargs)

    def prepare_inputs(self, original, input_ids, *args, **kwargs):
        """The patched ``prepare_inputs_for_generation``: lengths between ``input_ids`` and a shortened
        cache when a ``generate()`` continues one; 2-D masks kept for static caches."""
        cache = kwargs.get("past_key_values")
        translation = self.decode.get(cache)
        if translation is not None:
            kwargs["next_sequence_length"] = continuation_length(
                kwargs.get("next_sequence_length"), input_ids, cache, translation.shrink
            )
        inputs = original(input_ids, *args, **kwargs)
        mask = kwargs.get("attention_mask")
        if is_static(cache) and (mask is None or mask.dim() == 2):
            # generate() builds 4-D masks for static caches in the prompt's original layout; the
            # forward maps the 2-D one onto the shortened prompt and the model builds its own.
            inputs["attention_mask"] = mask
        return inputs

    def map_decode_step(self, a: dict) -> None:
        """A forward without images (``a``: its arguments) that continues a shortened cache: its
        original-length mask and positions mapped onto the cache, in place."""
        cache = a.get("past_key_values")
        translation = self.decode.get(cache)
        if translation is None:
            return
        q_len = a["input_ids"].shape[1] if a.get("input_ids") is not None else a["inputs_embeds"].shape[1]
        a["attention_mask"] = translation.attention_mask(a.get("attention_mask"), cache.get_seq_length() + q_len)
        a["position_ids"] = translation.position_ids(a.get("position_ids"))
