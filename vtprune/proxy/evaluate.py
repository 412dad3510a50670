"""Accuracy of a proxy LLaVA on easy-vqa: the answer is the best of the 13 possible answers by the
logit of its first token after the prompt (``vtprune.proxy.prompt``).

Every question runs as one full forward (image and question together, left-padded batches), so a
pruner applied around the call, vision-stage or LLM-stage, sees exactly what it sees in ``generate``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from vtprune.proxy import data
from vtprune.proxy import prompt as fmt


def answer_first_tokens(tokenizer) -> torch.Tensor:
    """(13,) long: the first token id of each answer of ``data.answers()``; they must all differ."""
    ids = [tokenizer.encode(a, add_special_tokens=False)[0] for a in data.answers()]
    if len(set(ids)) != len(ids):
        raise RuntimeError(f"answers share a first token under this tokenizer: {dict(zip(data.answers(), ids))}")
    return torch.tensor(ids)


def _as_context(context):
    if context is None:
        return contextlib.nullcontext()
    if hasattr(context, "__enter__") and hasattr(context, "__exit__"):
        return context
    if callable(context):
        made = context()
        if not (hasattr(made, "__enter__") and hasattr(made, "__exit__")):
            raise TypeError(f"context() must return a context manager, got {type(made).__name__}")
        return made
    raise TypeError(
        f"context must be None, a context manager or a callable returning one, got {type(context).__name__}"
    )


@torch.no_grad()
def predict(
    model, processor, items, batch_size: int = 8, progress: bool = False, layer_tokens: list | None = None
) -> list[str]:
    """The predicted answer (one of ``data.answers()``) for each ``data.Question`` in ``items``.

    ``layer_tokens``: a list to which, per question, the visual tokens entering each decoder layer are
    appended (a list of ints, one per layer): what the active pruner's handle recorded
    (``PruneStats.layer_tokens``), or the image's tokens in every layer when nothing prunes.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if layer_tokens is not None and not isinstance(layer_tokens, list):
        raise TypeError(f"layer_tokens must be None or a list to append to, got {type(layer_tokens).__name__}")
    items = list(items)
    if not all(isinstance(q, data.Question) for q in items):
        raise TypeError("items must be vtprune.proxy.data.Question objects (see data.subset)")
    candidates = answer_first_tokens(processor.tokenizer)
    names = data.answers()
    processor.tokenizer.padding_side = "left"  # the last position is then every row's answer position
    steps = range(0, len(items), batch_size)
    if progress:
        from tqdm import tqdm

        steps = tqdm(steps, desc="evaluate", unit="batch")
    out = []
    for start in steps:
        batch = items[start : start + batch_size]
        inputs = processor(
            images=[data.load_image(q.split, q.image_id) for q in batch],
            text=[fmt.prompt(q.text) for q in batch],
            return_tensors="pt",
            padding=True,
        )
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        logits = model(**inputs, logits_to_keep=1).logits[:, -1]  # (B, vocab)
        choice = logits[:, candidates].argmax(-1)  # (B,) index into the 13 answers
        out.extend(names[i] for i in choice.tolist())
        if layer_tokens is not None:
            layer_tokens.extend(_layer_tokens(model, inputs["input_ids"]))
    return out


def _layer_tokens(model, input_ids: torch.Tensor) -> list[list[int]]:
    """Per row of the batch just run, the visual tokens entering each decoder layer."""
    from vtprune.api import handle_of

    handle = handle_of(model)
    if handle is not None and handle.last is not None:
        return [list(row) for row in handle.last.layer_tokens]
    layers = model.config.text_config.num_hidden_layers
    return [[int(n)] * layers for n in (input_ids == model.config.image_token_id).sum(1).tolist()]


def mean_tokens(layer_tokens: list[list[int]]) -> float:
    """Visual tokens per decoder layer, the mean over layers and then over questions."""
    if not layer_tokens:
        raise ValueError("no questions: layer_tokens is empty")
    return sum(sum(row) / len(row) for row in layer_tokens) / len(layer_tokens)


def accuracy(items, predictions) -> float:
    """Share in [0, 1] of ``predictions`` equal to the answers of the ``data.Question`` ``items``."""
    items, predictions = list(items), list(predictions)
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} questions but {len(predictions)} predictions")
    return sum(p == q.answer for p, q in zip(predictions, items)) / len(items)


def accuracy_by_kind(items, predictions) -> dict[str, float]:
    """Accuracy in [0, 1] per kind of question: ``"shape"``, ``"colour"``, and yes/no questions split
    by whether the shape or colour they name is in the image (``"yes/no present"``, ``"yes/no absent"``;
    negated or not), the split that shows whether a model reads the image or the answer prior.
    Kinds with no question in ``items`` are left out.
    """
    items, predictions = list(items), list(predictions)
    if len(items) != len(predictions):
        raise ValueError(f"{len(items)} questions but {len(predictions)} predictions")
    right: dict[str, list[bool]] = {}
    for q, p in zip(items, predictions):
        right.setdefault(question_kind(q), []).append(p == q.answer)
    return {name: sum(right[name]) / len(right[name]) for name in KINDS if name in right}


KINDS = ("shape", "colour", "yes/no present", "yes/no absent")
IMAGE_READING = ("shape", "colour")  # the kinds the proxy answers from the image, not from a prior


def question_kind(q) -> str:
    """One of ``KINDS`` for a ``data.Question``."""
    present = data.named_present(q)
    return data.kind(q) if present is None else ("yes/no present" if present else "yes/no absent")


def kind_counts(items) -> dict[str, int]:
    """Questions of each kind in ``items``."""
    counts: dict[str, int] = {}
    for q in items:
        counts[question_kind(q)] = counts.get(question_kind(q), 0) + 1
    return {name: counts[name] for name in KINDS if name in counts}


def pooled(by_kind: dict[str, float], counts: dict[str, int], kinds) -> float | None:
    """Accuracy over several kinds together, from per-kind accuracies and question counts (the kinds
    with questions); None when none of them has any."""
    kinds = [k for k in kinds if counts.get(k) and k in by_kind]
    total = sum(counts[k] for k in kinds)
    return sum(by_kind[k] * counts[k] for k in kinds) / total if total else None


def evaluate(
    model,
    processor,
    n: int = 1000,
    seed: int = 0,
    split: str = "test",
    context: Callable | contextlib.AbstractContextManager | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> float:
    """Accuracy in [0, 1] on ``data.subset(split, n, seed)`` (default: a fixed 1,000 test questions).

    ``context``: run under it, e.g. ``lambda: vtprune.apply(model, "divprune", keep=32)`` (a callable
    returning a context manager, entered once around the whole evaluation) or a context manager.
    """
    items = data.subset(split, n, seed)
    with _as_context(context):
        predictions = predict(model, processor, items, batch_size=batch_size, progress=progress)
    return accuracy(items, predictions)
