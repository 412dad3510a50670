"""One forward through the decoder, as the LLM stage sees it: the plan (each image's drop points, the
layers that score for them, the transition window), the state the hooks carry from layer to layer,
and, once the forward has run, what it kept (``PruneStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from vtprune.core.compaction import Compaction
from vtprune.core.layout import VisualLayout
from vtprune.core.llm_signals import SIGNALS, TOWER, TRANSITION
from vtprune.core.schedule import DropPoint, check_point_order
from vtprune.core.stats import PruneStats
from vtprune.core.tokens import ModelInfo, PromptTokens


class LLMPruner(Protocol):
    """What the stage asks of an LLM-stage pruner (``vtprune.LLMPruner`` documents each member)."""

    name: str
    signals: tuple[str, ...]
    score_offset: int
    always_selects: bool
    joint: bool

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]: ...

    def sample_drop_points(self, info: ModelInfo, sizes: list[int]) -> list[list[DropPoint]]: ...

    def transition_layers(self, info: ModelInfo, points: list[DropPoint]) -> range: ...

    def select(self, tokens: PromptTokens) -> torch.Tensor: ...


@dataclass
class ImageState:
    """One image of one sample in a prefill."""

    sample: int
    span: torch.Tensor  # (N,) its tokens' positions in the prompt
    points: dict[int, tuple[DropPoint, LLMPruner]]  # drop layer -> (point, the pruner that owns it)
    grid: tuple[int, int] | None
    present: torch.Tensor  # ascending indices into the image's tokens still in the sequence
    tower: torch.Tensor | None = None  # (N,) the tower's CLS attention over the image's tokens
    # Recycled tokens present: anchor -> the image's tokens behind it (anchor first), for the stats.
    groups: dict = field(default_factory=dict)
    counts: list[tuple[int, int]] = field(default_factory=list)  # (layer, tokens from then on)


@dataclass
class CallState:
    """State of one forward call through the decoder."""

    layout: VisualLayout | None  # None: no images in this call (the LLM stage does nothing)
    key_mask: torch.Tensor | None = None  # (B, L) bool padding mask of the prompt
    score_row: int | None = None  # position of the last prompt token; None: the last position
    restore_outputs: bool = False  # the caller collects every layer's hidden states or attention weights
    reuse: tuple | None = None  # (choices, recycled) of an earlier call, a choice to repeat
    images: list[ImageState] = field(default_factory=list)
    scored_at: dict = field(default_factory=dict)  # scoring layer -> [(drop layer, signals)]
    signals: dict = field(default_factory=dict)  # drop layer -> {signal: (B, L) fp32, original positions}
    transition: torch.Tensor | None = None  # (B, L) fp32 accumulated transition variation
    raters: list | None = None  # per sample, original positions of its text raters (signal "raters")
    transition_layers: frozenset = frozenset()
    compaction: Compaction | None = None  # original positions still present; None: nothing dropped yet
    full_hidden: torch.Tensor | None = None
    layer_compactions: list | None = None  # per decoder layer (None before the first drop), for decode steps
    choices: dict = field(default_factory=dict)  # drop layer -> presents per image (recycled ones by anchor)
    recycled: dict = field(default_factory=dict)  # drop layer -> per image [(members, weights or None)]
    converted: dict = field(default_factory=dict)  # (id(kwarg), id(compaction)) -> (kwarg, compaction, converted)
    stats: PruneStats | None = None  # what this call kept, once it has run

    @property
    def last(self) -> int:
        """The position of the last prompt token (the same in every sample: left padding)."""
        return self.score_row if self.score_row is not None else self.layout.length - 1

    def instruction(self, b: int, device) -> torch.Tensor:
        """Original positions of sample ``b``'s prompt tokens after its last image (padding left out),
        or of the last token when it has no image."""
        start = self.layout.ends[b] + 1 if self.layout.ends[b] >= 0 else self.last
        positions = torch.arange(start, self.last + 1, device=device)
        if self.key_mask is not None:
            positions = positions[self.key_mask[b, positions].to(device)]
        return positions


def plan(call: CallState, pruners: list, info: ModelInfo, grids: list | None, tower: list | None = None) -> None:
    """Each image's drop points, the layers that score for them, and the transition window."""
    flat = 0
    reads_tower = [p.name for p in pruners if TOWER in p.signals]
    for b, spans in enumerate(call.layout.spans):
        sizes = [span.numel() for span in spans]
        schedules = [pruner.sample_drop_points(info, sizes) for pruner in pruners]
        for n, span in enumerate(spans):
            grid = grids[flat] if grids is not None else None
            scores = tower[flat] if tower is not None else None
            flat += 1
            if reads_tower and (scores is None or scores.numel() != span.numel()):
                raise NotImplementedError(
                    f"the {reads_tower[0]!r} pruner reads the vision tower's CLS attention, which vtprune did not "
                    f"record for this image's {span.numel()} tokens"
                )
            mine = [schedule[n] for schedule in schedules]
            check_point_order([(pruner.name, points) for pruner, points in zip(pruners, mine)])
            points = {point.layer: (point, pruner) for pruner, pts in zip(pruners, mine) for point in pts}
            present = torch.arange(span.numel(), device=span.device)
            call.images.append(ImageState(sample=b, span=span, points=points, grid=grid, present=present, tower=scores))
    last = call.last
    if call.key_mask is not None and not bool(call.key_mask[:, last].all()):
        raise ValueError(
            "LLM-stage pruners score with each sample's last prompt token, which must be the same position "
            "in every sample: pad batches on the left (tokenizer/processor padding_side='left')"
        )
    if any(end >= last for end in call.layout.ends):
        raise ValueError(
            "LLM-stage pruners score visual tokens with the text after the last image; this prompt ends "
            "with image tokens (add the question or the chat template's assistant prefix after the image)"
        )
    if call.reuse is not None:
        return
    drops = {layer: pruner for image in call.images for layer, (_, pruner) in image.points.items()}
    for layer, pruner in sorted(drops.items()):
        by_layer: dict[int, tuple[str, ...]] = {}
        for name in pruner.signals:
            at = layer - pruner.score_offset - SIGNALS[name].earlier
            if at < 0:
                raise ValueError(
                    f"the {pruner.name!r} pruner's signal {name!r} for its drop before layer {layer} would be "
                    f"computed before the first decoder layer (layer {at})"
                )
            by_layer[at] = (*by_layer.get(at, ()), name)
        for at, names in by_layer.items():
            call.scored_at.setdefault(at, []).append((layer, names))
    window = set()
    for image in call.images:
        owners = {id(pruner): pruner for _, pruner in image.points.values() if TRANSITION in pruner.signals}
        for pruner in owners.values():
            points = [point for point, owner in image.points.values() if owner is pruner]
            window.update(i for i in pruner.transition_layers(info, points) if i < points[-1].layer)
    call.transition_layers = frozenset(window)


def call_stats(call: CallState, n_layers: int) -> PruneStats:
    spans = call.layout.spans
    samples = range(len(spans))
    alone = [_without_anchors(im) for im in call.images]
    kept = call.layout.sample_kept([[a for a, im in zip(alone, call.images) if im.sample == b] for b in samples])
    groups = [[list(im.groups.values()) for im in call.images if im.sample == b] for b in samples]
    merged = call.layout.sample_groups(groups) if any(im.groups for im in call.images) else []
    layer_tokens = []
    for b in range(len(spans)):
        totals = [0] * n_layers
        for image in (im for im in call.images if im.sample == b):
            count, steps = image.span.numel(), dict(image.counts)
            for layer in range(n_layers):
                count = steps.get(layer, count)
                totals[layer] += count
        layer_tokens.append(totals)
    drops = [
        (
            layer,
            call.layout.sample_kept(
                [[p for p, im in zip(presents, call.images) if im.sample == b] for b in range(len(spans))]
            ),
        )
        for layer, presents in sorted(call.choices.items())
    ]
    return PruneStats(kept=kept, layer_tokens=layer_tokens, drops=drops, merged=merged)


def _without_anchors(image: ImageState) -> torch.Tensor:
    if not image.groups:
        return image.present
    anchors = torch.tensor(sorted(image.groups), dtype=torch.long, device=image.present.device)
    return image.present[~torch.isin(image.present, anchors)]
