"""The decode stage: decode steps over caches whose layers hold fewer tokens than the sequence, and a
cache policy removing visual entries from them between decoding steps.

Each decoder layer's KV cache holds the tokens that entered the layer: after an LLM-stage prefill,
later layers hold fewer. A decode step arrives with one mask over the sequence's *columns* (the prompt
as the language model received it, then the generated tokens); each layer with fewer slots gets that
mask gathered to its own slots, and, when the call asks for attention weights, its weights scattered
back to the columns. A slot map per layer (``Compaction``: slot -> column) says what each slot holds.

A cache policy (``DecodePruner``) looks, before a decode step, at the visual entries a layer holds and
says which stay; the others leave the cache tensors, per sample (samples then hold different numbers:
shorter ones are left-padded with masked slots, like the LLM stage's compaction), and the layer's map
follows. Layer 0 is never touched: its length is the sequence length ``generate()`` counts from.
Beam search reorders the maps with the cache; assisted decoding's crops cut generated tokens, which
policies never remove.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from vtprune.core.cache_state import CacheState
from vtprune.core.compaction import Compaction, scatter_attention
from vtprune.core.decoder import DecoderAccess
from vtprune.core.layout import VisualLayout
from vtprune.core.masks import compact_mask
from vtprune.core.patching import MethodPatch, PerThread
from vtprune.core.stats import PruneStats
from vtprune.core.tokens import ModelInfo, Reduction


@dataclass
class HeldTokens:
    """One image's visual entries in one decoder layer's KV cache, before decode step ``step`` (0: the
    first step after the prefill).

    positions: (H,) ascending indices of the entries among the image's tokens as they entered the
        language model (``PromptTokens.positions``' indexing); final: (H,) bool, whether each reached
        the last decoder layer in the prefill; first_drop: the first decoder layer at which the LLM
        stage dropped any of the image's tokens (None: it dropped none).
    """

    layer: int
    step: int
    positions: torch.Tensor
    final: torch.Tensor
    first_drop: int | None

    def __len__(self) -> int:
        return int(self.positions.numel())


class DecodePruner(Protocol):
    """What the stage asks of a cache policy (``vtprune.DecodePruner`` documents each member)."""

    name: str

    def evicts_at(self, step: int) -> bool: ...

    def first_layer(self, info: ModelInfo) -> int: ...

    def hold(self, tokens: HeldTokens) -> torch.Tensor: ...


@dataclass
class DecodeState:
    """What a cache's layers hold, stored on the cache after a prefill that left any layer shorter or
    that a cache policy watches. Prompt columns are described by ``image`` and ``token`` (B, L): the
    image (numbered over the batch in layout order) and the index among its tokens of each visual
    column, -1 for text; ``final`` (B, L) bool: the columns that reached the last decoder layer."""

    slots: list[Compaction | None]  # per decoder layer: slot -> column; None: slot i holds column i
    image: torch.Tensor | None = None
    token: torch.Tensor | None = None
    final: torch.Tensor | None = None
    first_drop: list[int | None] = field(default_factory=list)  # per image
    held: list[list[int]] = field(default_factory=list)  # per row, visual entries each layer holds
    stats: PruneStats | None = None  # the prefill's, where held counts per step are appended
    step: int = 0

    def reorder(self, original, beam_idx: torch.Tensor) -> None:
        """The cache's ``reorder_cache`` (beam search): rows move with their cache rows."""
        original(beam_idx)
        rows = beam_idx.to(torch.long)
        self.slots = [None if s is None else _rows(s, rows) for s in self.slots]
        for name in ("image", "token", "final"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value[rows.to(value.device)])
        self.held = [list(self.held[r]) for r in rows.tolist()]

    def columns(self, i: int, held_columns: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(index, valid), each (B, slots): the column of each slot of layer ``i``'s cache, which holds
        ``held_columns`` columns' worth of tokens."""
        slots = self.slots[i]
        if slots is not None:
            return slots.key_columns(held_columns)
        index = torch.arange(held_columns, device=self.image.device).expand(self.image.shape[0], -1)
        return index, torch.ones_like(index, dtype=torch.bool)

    def slot_images(self, index: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For slots holding columns ``index`` (valid where ``valid``): the image of each slot (-1: text,
        generated or padding) and the prompt column to read its description at."""
        prompt = self.image.shape[1]
        at = index.clamp(max=prompt - 1)
        return torch.where(valid & (index < prompt), self.image.gather(1, at), -1), at


@dataclass
class DecodeCall:
    """One decode forward: its state, step, sequence length after it, and columns per layer."""

    restore_outputs: bool
    state: DecodeState | None = None
    step: int = 0
    kv_len: int = 0
    columns: dict = field(default_factory=dict)  # layer -> (kv_index, kv_valid, kv_len)
    # (id(mask), id(slot map)) -> (mask, slot map, kv_index, kv_valid, converted mask): layers sharing a
    # map share its conversion (holding both keeps their ids from being reused during the call)
    converted: dict = field(default_factory=dict)


class DecodeStage:
    def __init__(
        self, pruner: DecodePruner | None, layers: nn.ModuleList, info: ModelInfo, decoder: DecoderAccess, flash: bool
    ):
        self.pruner = pruner
        self.layers = layers
        self.info = info
        self.decoder = decoder
        self.flash = flash
        self._calls = PerThread()
        self._states = CacheState("decode_stage")

    def install(self) -> list:
        handles = []
        for i, layer in enumerate(self.layers):
            handles.append(layer.register_forward_pre_hook(functools.partial(self._before, i), with_kwargs=True))
            handles.append(
                self.decoder.sublayers(layer)[0].register_forward_hook(
                    functools.partial(self._after_attention, i), prepend=True
                )
            )
        return handles

    def prefill(
        self, cache, layout: VisualLayout | None, slots: list | None, stats: PruneStats | None
    ) -> DecodeState | None:
        """Record what a prefill left in ``cache``: per layer ``slots`` (the LLM stage's compactions, or
        None), and, for a cache policy, the visual columns of ``layout`` (the prompt as the language
        model received it) and which of them reached the last layer."""
        if cache is None or (slots is None and self.pruner is None):
            return None
        slots = list(slots) if slots is not None else [None] * len(self.layers)
        state = DecodeState(slots=slots, stats=stats)
        if self.pruner is not None and layout is not None and layout.has_images:
            self._describe(state, layout)
            MethodPatch(cache, "reorder_cache", state.reorder)
        self._states[cache] = state
        return state

    def _describe(self, state: DecodeState, layout: VisualLayout) -> None:
        device = layout.spans[next(b for b, s in enumerate(layout.spans) if s)][0].device
        shape = (len(layout.spans), layout.length)
        image = torch.full(shape, -1, dtype=torch.long, device=device)
        token = torch.full(shape, -1, dtype=torch.long, device=device)
        number = 0
        for b, spans in enumerate(layout.spans):
            for span in spans:
                image[b, span] = number
                token[b, span] = torch.arange(span.numel(), device=device)
                number += 1
        last = state.slots[-1]
        if last is None:
            final = torch.ones(shape, dtype=torch.bool, device=device)
        else:
            final = torch.zeros(shape, dtype=torch.bool, device=device).scatter_(1, last.index, last.valid)
        state.image, state.token, state.final = image, token, final
        state.first_drop = []
        for b, spans in enumerate(layout.spans):
            for span in spans:
                dropped_at = [i for i, s in enumerate(state.slots) if s is not None and not _holds_all(s, b, span)]
                state.first_drop.append(dropped_at[0] if dropped_at else None)
        counts = [(state.slot_images(*state.columns(i, layout.length))[0] >= 0).sum(1) for i in range(len(self.layers))]
        state.held = torch.stack(counts, dim=1).tolist()
        if state.stats is not None:
            state.stats.decode_tokens = [[] for _ in layout.spans]

    @contextmanager
    def call(self, restore_outputs: bool):
        """Scope one forward without images (a decode step, or text continuing a cache)."""
        with self._calls.set(DecodeCall(restore_outputs=restore_outputs)) as call:
            yield call
            state = call.state
            if state is not None and state.stats is not None and state.stats.decode_tokens:
                for b, counts in enumerate(state.held):
                    state.stats.decode_tokens[b].append(list(counts))

    # -- hooks -------------------------------------------------------------------------------------
    def _before(self, i: int, layer, args, kwargs):
        call = self._calls.get()
        cache = kwargs.get("past_key_values")
        if call is None or cache is None:
            return None
        q_len = (args[0] if args else kwargs["hidden_states"]).shape[1]
        if i == 0:
            call.state = self._states.get(cache)
            if call.state is None:
                return None
            call.step, call.state.step = call.state.step, call.state.step + 1
            call.kv_len = cache.layers[0].get_seq_length() + q_len
        state = call.state
        if state is None:
            return None
        mask = kwargs.get("attention_mask")
        kv_len = mask.shape[-1] if mask is not None else call.kv_len
        policy = self.pruner
        if state.image is not None and i > 0 and policy.evicts_at(call.step) and i >= policy.first_layer(self.info):
            self._policy(call.step, state, i, cache, kv_len - q_len)
        slots = state.slots[i]
        if slots is None:
            return None
        key = (id(mask), id(slots))
        if key not in call.converted:
            kv_index, kv_valid = slots.key_columns(kv_len)
            converted = compact_mask(
                mask,
                q_index=None,
                q_valid=None,
                kv_index=kv_index,
                kv_valid=kv_valid,
                q_len=q_len,
                kv_len=kv_len,
                flash=self.flash,
            )
            call.converted[key] = (mask, slots, kv_index, kv_valid, converted)
        _, _, kv_index, kv_valid, kwargs["attention_mask"] = call.converted[key]
        call.columns[i] = (kv_index, kv_valid, kv_len)
        return args, kwargs

    def _after_attention(self, i: int, attention, args, output):
        call = self._calls.get()
        if call is None or not call.restore_outputs or i not in call.columns:
            return None
        if not isinstance(output, tuple) or output[1] is None:
            return None
        return (output[0], scatter_attention(output[1], *call.columns[i]), *output[2:])

    # -- the cache policy ---------------------------------------------------------------------------
    def _policy(self, step: int, state: DecodeState, i: int, cache, held_columns: int) -> None:
        """Before layer ``i`` reads its cache: the policy's choice among the visual entries it holds."""
        index, valid = state.columns(i, held_columns)
        image, at = state.slot_images(index, valid)
        keep = valid.clone()
        for b in range(image.shape[0]):
            for number in image[b][image[b] >= 0].unique().tolist():
                where = (image[b] == number).nonzero().flatten()
                held = HeldTokens(
                    layer=i,
                    step=step,
                    positions=state.token[b, at[b, where]],
                    final=state.final[b, at[b, where]],
                    first_drop=state.first_drop[number],
                )
                chosen = _checked(self.pruner, self.pruner.hold(held), len(held), where.device)
                dropped = torch.ones(where.numel(), dtype=torch.bool, device=where.device)
                dropped[chosen] = False
                keep[b, where[dropped]] = False
        if not bool((keep == valid).all()):
            image = self._evict(state, i, cache, index, keep, held_columns, image)
        for b, count in enumerate((image >= 0).sum(1).tolist()):
            state.held[b][i] = count

    def _evict(self, state, i, cache, index, keep, held_columns, image) -> torch.Tensor:
        inner = Compaction.from_keep(keep)
        layer = cache.layers[i]
        layer.keys = inner.gather(layer.keys.transpose(1, 2)).transpose(1, 2).contiguous()
        layer.values = inner.gather(layer.values.transpose(1, 2)).transpose(1, 2).contiguous()
        state.slots[i] = Compaction(index=index.gather(1, inner.index), valid=inner.valid, length=held_columns)
        return torch.where(inner.valid, image.gather(1, inner.index), -1)


def _rows(slots: Compaction, rows: torch.Tensor) -> Compaction:
    rows = rows.to(slots.index.device)
    return Compaction(index=slots.index[rows], valid=slots.valid[rows], length=slots.length)


def _holds_all(slots: Compaction, b: int, span: torch.Tensor) -> bool:
    held = slots.index[b][slots.valid[b]]
    return bool(torch.isin(span.to(held.device), held).all())


def _checked(pruner, idx, n: int, device) -> torch.Tensor:
    if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"the {pruner.name!r} pruner's hold() must return a 1-D integer tensor, got {idx!r}")
    idx = idx.to(device, torch.long)
    if not Reduction(idx).fits(n, n):
        raise ValueError(
            f"the {pruner.name!r} pruner's hold() must return ascending, distinct indices in [0, {n}), "
            f"got {idx.tolist()}"
        )
    return idx
