"""What ``generate()`` knows and the forward does not: where the prompt ends, and how long a pruned
cache is in the units of ``input_ids``.

``generate()`` feeds the model forwards that are not just "the prompt": assisted decoding's first
forward holds the prompt plus the assistant's candidate tokens, and ``use_cache=False`` re-runs the
whole sequence at every step. Pruners that score with the last prompt token read its position here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GenerateCall:
    """One ``generate()`` call in flight."""

    prompt_length: int  # tokens in the prompt given to generate() (input_ids or inputs_embeds)
    kept: list | None = None  # the LLM stage's choice at the first forward, reused by later full forwards


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
