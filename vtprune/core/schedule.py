"""Drop schedules of LLM-stage pruners: before which decoder layers visual tokens drop, and how many stay.

A schedule for one image is a list of ``DropPoint(layer, keep)`` with increasing layers and
non-increasing ``keep``: the image enters layers ``< layer_1`` with all its tokens, layers
``layer_j .. layer_{j+1}-1`` with ``keep_j`` of them. Multi-drop pruners state a *shape* (drop depths
as fractions of the decoder, kept ratios) and ``fit_average`` turns it into counts whose per-layer
mean is a given budget, the way PyramidDrop and SparseVLM compare themselves with FastV.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass


@dataclass(frozen=True)
class DropPoint:
    layer: int  # decoder layer (0-based) before which the drop happens
    keep: int  # visual tokens of the image that enter ``layer`` and the layers after it


def layer_counts(points: list[DropPoint], num_layers: int, n_tokens: int) -> list[int]:
    """Visual tokens entering each decoder layer under ``points``."""
    counts, current, j = [], n_tokens, 0
    for layer in range(num_layers):
        while j < len(points) and points[j].layer <= layer:
            current = min(current, points[j].keep)
            j += 1
        counts.append(current)
    return counts


def mean_tokens(points: list[DropPoint], num_layers: int, n_tokens: int) -> float:
    return sum(layer_counts(points, num_layers, n_tokens)) / num_layers


def budget_count(keep: int | float, n_tokens: int) -> int:
    """Tokens kept of ``n_tokens``: an int ``keep`` capped at ``n_tokens``, a float the rounded fraction
    (at least one)."""
    if isinstance(keep, numbers.Integral):
        return min(int(keep), n_tokens)
    return min(n_tokens, max(1, round(float(keep) * n_tokens)))


def budget_tokens(keep: int | float, n_tokens: int) -> float:
    """An int ``keep`` is tokens (capped at ``n_tokens``); a float is a fraction of ``n_tokens``."""
    if isinstance(keep, numbers.Integral):
        return float(min(int(keep), n_tokens))
    return float(keep) * n_tokens


def scaled_layers(depths: list[float], num_layers: int) -> list[int]:
    """Drop layers at fractions ``depths`` of the decoder: increasing, in ``[1, num_layers - 1]``."""
    layers, previous = [], 0
    for d in depths:
        layer = min(max(round(d * num_layers), previous + 1), num_layers - 1)
        if layer <= previous:
            break  # a decoder too shallow for this many drops keeps the first ones
        layers.append(layer)
        previous = layer
    return layers


def _counts(ratios: list[float], scale: float, n_tokens: int) -> list[int]:
    counts, previous = [], n_tokens
    for r in ratios:
        previous = max(1, min(previous, round(scale * r * n_tokens)))
        counts.append(previous)
    return counts


# The reference schedules (PyramidDrop, TransPrune at their papers' budgets) keep about a quarter of
# their mean number of tokens through to the last layers; smaller budgets keep that proportion by
# dropping earlier, instead of spending the budget on full early layers and keeping almost nothing.
FINAL_SHARE = 0.25


def _scaled(layers: list[int], shape: list[float], num_layers: int, n_tokens: int, average: float) -> list[DropPoint]:
    """Counts ``shape`` scaled by one factor whose mean is closest to ``average`` (bisection)."""
    lo, hi = 0.0, 1.0 / min(shape)
    for _ in range(50):  # the mean grows with the scale
        mid = (lo + hi) / 2
        points = [DropPoint(x, c) for x, c in zip(layers, _counts(shape, mid, n_tokens))]
        if mean_tokens(points, num_layers, n_tokens) < average:
            lo = mid
        else:
            hi = mid
    candidates = [[DropPoint(x, c) for x, c in zip(layers, _counts(shape, s, n_tokens))] for s in (lo, hi)]
    return min(candidates, key=lambda p: abs(mean_tokens(p, num_layers, n_tokens) - average))


def fit_average(
    depths: list[float], ratios: list[float], num_layers: int, n_tokens: int, average: float
) -> list[DropPoint]:
    """Drop points of the shape (``depths``, ``ratios``) whose mean over the layers is ``average`` tokens.

    The ratios are scaled by one factor (kept ratios never exceed 1), so consecutive stages keep the
    method's proportions. The drop depths are the method's when that leaves at least ``FINAL_SHARE``
    of the mean to the last layers; otherwise all of them move earlier by one factor, the least that
    does (down to drops before layers 1, 2, 3, ...), or the one keeping most if none does. The mean
    matches ``average`` up to the rounding of counts, unless even one token per image after a drop
    before layer 1 exceeds it: then that schedule runs.
    """
    if average >= n_tokens:
        return []
    best = None
    for shrink in [1.0] + [i / 20 for i in range(19, 0, -1)] + [0.0]:
        layers = scaled_layers([d * shrink for d in depths], num_layers)
        shape = ratios[: len(layers)]
        if mean_tokens([DropPoint(x, 1) for x in layers], num_layers, n_tokens) > average:
            if shrink == 0.0 and best is None:
                return [DropPoint(x, 1) for x in layers]
            continue
        points = _scaled(layers, shape, num_layers, n_tokens, average)
        if points[-1].keep >= FINAL_SHARE * average:
            return points
        if best is None or points[-1].keep > best[-1].keep:
            best = points
    return best


def published(depths: list[float], ratios: list[float], num_layers: int, n_tokens: int) -> list[DropPoint]:
    """A method's own schedule on this decoder: drops at fractions ``depths`` of it (``scaled_layers``,
    never moved to meet a budget), each keeping ``ratios`` of the ``n_tokens`` (rounded, at least one)."""
    layers = scaled_layers(depths, num_layers)
    return [DropPoint(layer, c) for layer, c in zip(layers, _counts(ratios[: len(layers)], 1.0, n_tokens))]


def explicit(schedule: list[tuple[int, int | float]], n_tokens: int) -> list[DropPoint]:
    """``[(layer, keep), ...]`` as drop points for an image of ``n_tokens`` (keep as ``budget_tokens``)."""
    points, previous = [], n_tokens
    for layer, keep in schedule:
        previous = min(previous, budget_count(keep, n_tokens))
        points.append(DropPoint(layer, previous))
    return points


def check_explicit(schedule, num_layers: int | None) -> None:
    """Raise ValueError unless ``schedule`` is ``[(layer, keep), ...]`` with increasing layers in
    ``[1, num_layers - 1]`` (``num_layers`` None: any layer >= 1, before the model is known) and
    non-increasing keeps of one kind."""

    def bad(why: str):
        return ValueError(f"schedule must be [(layer, keep), ...] with {why}; got {schedule!r}")

    if not isinstance(schedule, (list, tuple)) or not schedule:
        raise bad("at least one drop point")
    layers, keeps = [], []
    for point in schedule:
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            raise bad("pairs")
        layer, keep = point
        if isinstance(layer, bool) or not isinstance(layer, int) or layer < 1:
            raise bad("int layers >= 1")
        if num_layers is not None and layer >= num_layers:
            raise bad(f"layers in [1, {num_layers - 1}] for this {num_layers}-layer decoder")
        if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
            raise bad("int keeps (tokens per image) or float keeps in (0, 1]")
        if (
            isinstance(keep, numbers.Integral)
            and keep < 1
            or not isinstance(keep, numbers.Integral)
            and not 0 < keep <= 1
        ):
            raise bad("int keeps >= 1 or float keeps in (0, 1]")
        layers.append(layer)
        keeps.append(keep)
    if any(b <= a for a, b in zip(layers, layers[1:])):
        raise bad("strictly increasing layers")
    if len({isinstance(k, numbers.Integral) for k in keeps}) > 1:
        raise bad("keeps all ints or all floats")
    if any(b > a for a, b in zip(keeps, keeps[1:])):
        raise bad("non-increasing keeps (a later drop cannot keep more)")


def check_llm_order(pruners: list, info, n_tokens: int) -> None:
    """Raise ValueError unless the pruners' drop points for an image of ``n_tokens`` come at
    increasing layers, each pruner after the one before, and never keep more than before."""
    check_point_order([(p.name, p.drop_points(info, n_tokens)) for p in pruners])


def check_point_order(schedules: list[tuple[str, list[DropPoint]]]) -> None:
    """``check_llm_order`` for one image's drop points, given as (pruner name, its points) in order."""
    previous = None  # (pruner name, its last drop point)
    for name, points in schedules:
        if points and previous is not None:
            before, last = previous
            if points[0].layer <= last.layer:
                raise ValueError(
                    f"LLM-stage pruners of a Pipeline must drop at increasing layers: {name!r} drops before "
                    f"layer {points[0].layer}, but {before!r} already dropped before layer {last.layer}"
                )
            if points[0].keep > last.keep:
                raise ValueError(
                    f"in a Pipeline a later pruner cannot keep more than an earlier one: {name!r} keeps "
                    f"{points[0].keep} tokens from layer {points[0].layer} after {before!r} kept {last.keep}"
                )
        if points:
            previous = (name, points[-1])
