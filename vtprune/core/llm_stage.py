"""The LLM stage: drop visual tokens inside the decoder at the drop points of a schedule.

A forward pre-hook on every decoder layer rewrites what the layer receives. At a drop point the
pruner scores the visual tokens still present and the hidden states are compacted again; every layer
after the first drop gets the position embeddings, position ids and mask columns of the tokens still
present, gathered from the model's own (full-length) ones, so kept tokens keep their original
positions and each layer's KV cache holds exactly the tokens that entered it. Decode steps map each
layer group's cache with the compaction stored for it.

A forward hook writes the kept tokens' outputs back into a full-length sequence, where dropped
tokens carry the hidden state they had when they were dropped, so outputs keep their usual shape:
on the last layer always, and on every pruned layer (and its attention weights) when the call asks
for hidden states or attentions.

Per-call state is kept per thread, so one model can serve several threads at once.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vtprune.core.cache_state import CacheState
from vtprune.core.compaction import Compaction, scatter_attention
from vtprune.core.layout import VisualLayout
from vtprune.core.llm_signals import instruction_attention, last_token_attention
from vtprune.core.masks import compact_mask
from vtprune.core.patching import PerThread
from vtprune.core.schedule import DropPoint, check_llm_order
from vtprune.ops import transition_variation
from vtprune.pruners.base import LLMPruner, ModelInfo, PromptTokens
from vtprune.stats import PruneStats

QueryKeyFn = Callable[[nn.Module, torch.Tensor, tuple, torch.Tensor], tuple]
SublayersFn = Callable[[nn.Module], tuple[nn.Module, nn.Module]]


@dataclass
class _Image:
    """One image of one sample in a prefill."""

    sample: int
    span: torch.Tensor  # (N,) its tokens' positions in the prompt
    points: dict[int, tuple[DropPoint, LLMPruner]]  # drop layer -> (point, the pruner that owns it)
    grid: tuple[int, int] | None
    present: torch.Tensor  # ascending indices into the image's tokens still in the sequence
    counts: list[tuple[int, int]] = field(default_factory=list)  # (layer, tokens from then on)


@dataclass
class _Call:
    """State of one forward call through the decoder."""

    layout: VisualLayout | None  # None: no images in this call (decode step or text only)
    key_mask: torch.Tensor | None = None  # (B, L) bool padding mask of the prompt
    score_row: int | None = None  # position of the last prompt token; None: the last position
    restore_outputs: bool = False  # the caller collects every layer's hidden states or attention weights
    reuse: dict | None = None  # drop layer -> presents per image, an earlier choice to repeat
    images: list[_Image] = field(default_factory=list)
    scored_at: dict = field(default_factory=dict)  # scoring layer -> [(drop layer, signals)]
    signals: dict = field(default_factory=dict)  # drop layer -> {signal: (B, L) fp32, original positions}
    transition: torch.Tensor | None = None  # (B, L) fp32 accumulated transition variation
    transition_layers: frozenset = frozenset()
    compaction: Compaction | None = None  # original positions still present; None: nothing dropped yet
    full_hidden: torch.Tensor | None = None
    layer_compactions: list | None = None  # per decoder layer, stored on the cache for decode steps
    choices: dict = field(default_factory=dict)  # drop layer -> presents per image
    decode_columns: dict = field(default_factory=dict)  # decode steps: layer -> (kv_index, kv_valid, kv_len)
    converted: dict = field(default_factory=dict)  # (id(kwarg), id(compaction)) -> (kwarg, compaction, converted)
    stats: PruneStats | None = None  # what this call kept, once it has run


class LLMStage:
    def __init__(
        self,
        pruners: list[LLMPruner],
        layers: nn.ModuleList,
        info: ModelInfo,
        query_key: QueryKeyFn,
        sublayers: SublayersFn,
        flash: bool,
    ):
        self.pruners = pruners
        self.layers = layers
        self.info = info
        self.query_key = query_key
        self.sublayers = sublayers
        self.flash = flash
        self._calls = PerThread()
        self._caches = CacheState("llm_stage")
        self.last: PruneStats | None = None

    def install(self) -> list:
        handles = []
        for i, layer in enumerate(self.layers):
            attention, mlp = self.sublayers(layer)
            handles.append(layer.register_forward_pre_hook(functools.partial(self._before, i), with_kwargs=True))
            # Prepended so that output-capturing hooks (transformers installs them on the first forward,
            # possibly before vtprune) see the restored full-length tensors.
            handles.append(layer.register_forward_hook(functools.partial(self._after, i), prepend=True))
            handles.append(
                attention.register_forward_hook(
                    functools.partial(self._after_attention, i), with_kwargs=True, prepend=True
                )
            )
            handles.append(mlp.register_forward_hook(functools.partial(self._after_mlp, i)))
        return handles

    @contextmanager
    def call(
        self,
        layout: VisualLayout | None,
        key_mask: torch.Tensor | None,
        *,
        grids: list | None = None,
        score_row: int | None = None,
        reuse: dict | None = None,
        restore_outputs: bool = False,
    ):
        """Scope one model forward; ``layout`` None for calls without images. ``grids``: the patch grid
        (or None) of each image in layout order. ``reuse`` repeats an earlier call's ``choices``
        instead of scoring again (the full forwards of ``generate(use_cache=False)``)."""
        has_images = layout is not None and layout.has_images
        state = _Call(
            layout=layout if has_images else None,
            key_mask=key_mask,
            score_row=score_row,
            reuse=reuse,
            restore_outputs=restore_outputs,
        )
        if has_images:
            self._plan(state, grids)
        with self._calls.set(state) as call:
            yield call
            if call.layout is not None:
                call.stats = self.last = self._stats(call)

    # -- planning ------------------------------------------------------------------------------------
    def _plan(self, call: _Call, grids: list | None) -> None:
        """Each image's drop points, the layers that score for them, and the transition window."""
        flat = 0
        for b, spans in enumerate(call.layout.spans):
            for span in spans:
                grid = grids[flat] if grids is not None else None
                flat += 1
                check_llm_order(self.pruners, self.info, span.numel())
                points = {
                    point.layer: (point, pruner)
                    for pruner in self.pruners
                    for point in pruner.drop_points(self.info, span.numel())
                }
                present = torch.arange(span.numel(), device=span.device)
                call.images.append(_Image(sample=b, span=span, points=points, grid=grid, present=present))
        last = call.score_row if call.score_row is not None else call.layout.length - 1
        if call.key_mask is not None and not bool(call.key_mask[:, last].all()):
            raise ValueError(
                "LLM-stage pruners score with each sample's last prompt token, which must be the same position "
                "in every sample: pad batches on the left (tokenizer/processor padding_side='left')"
            )
        if any(int(spans[-1][-1]) >= last for spans in call.layout.spans if spans):
            raise ValueError(
                "LLM-stage pruners score visual tokens with the text after the last image; this prompt ends "
                "with image tokens (add the question or the chat template's assistant prefix after the image)"
            )
        if call.reuse is not None:
            return
        drops = {layer: pruner for image in call.images for layer, (_, pruner) in image.points.items()}
        for layer, pruner in sorted(drops.items()):
            call.scored_at.setdefault(layer - pruner.score_offset, []).append((layer, pruner.signals))
        window = set()
        for image in call.images:
            owners = {id(pruner): pruner for _, pruner in image.points.values() if "transition" in pruner.signals}
            for pruner in owners.values():
                points = [point for point, owner in image.points.values() if owner is pruner]
                window.update(i for i in pruner.transition_layers(self.info, points) if i < points[-1].layer)
        call.transition_layers = frozenset(window)

    # -- hooks -------------------------------------------------------------------------------------
    def _before(self, i: int, layer, args, kwargs):
        call = self._calls.get()
        if call is None:
            return None
        if call.layout is None:
            return self._before_decode(i, args, kwargs)
        hidden = _hidden(args, kwargs)
        original = {k: kwargs.get(k) for k in ("position_embeddings", "position_ids", "attention_mask")}
        if call.compaction is not None and call.restore_outputs:
            hidden = call.compaction.gather(hidden)  # the previous layer's output was restored to full length
        for drop_layer, signals in call.scored_at.get(i, []):
            if drop_layer == i:
                self._score(call, layer, hidden, original, drop_layer, signals)
        if any(i in image.points for image in call.images):
            hidden = self._drop(call, i, hidden, kwargs.get("past_key_values"))
        for drop_layer, signals in call.scored_at.get(i, []):
            if drop_layer != i:
                self._score(call, layer, hidden, original, drop_layer, signals)
        if call.compaction is None:
            return None
        kwargs.update(self._inputs(call, call.compaction, original))
        return _replace_hidden(args, kwargs, hidden)

    def _before_decode(self, i: int, args, kwargs):
        call = self._calls.get()
        compactions = self._caches.get(kwargs.get("past_key_values"))
        comp = compactions[i] if compactions is not None else None
        if comp is None:
            return None
        mask = kwargs.get("attention_mask")
        q_len = _hidden(args, kwargs).shape[1]
        kv_len = mask.shape[-1] if mask is not None else kwargs["past_key_values"].get_seq_length(0)
        kv_index, kv_valid = comp.key_columns(kv_len)
        call.decode_columns[i] = (kv_index, kv_valid, kv_len)
        kwargs["attention_mask"] = self._convert(
            call,
            mask,
            comp,
            lambda m: compact_mask(
                m,
                q_index=None,
                q_valid=None,
                kv_index=kv_index,
                kv_valid=kv_valid,
                q_len=q_len,
                kv_len=kv_len,
                flash=self.flash,
            ),
        )
        return args, kwargs

    def _after(self, i: int, layer, args, output):
        call = self._calls.get()
        if call is None or call.compaction is None:
            return None
        if i != len(self.layers) - 1 and not call.restore_outputs:
            return None
        return call.compaction.scatter_into(call.full_hidden, output)

    def _after_attention(self, i: int, attention, args, kwargs, output):
        call = self._calls.get()
        if call is None:
            return None
        if call.layout is not None and i in call.transition_layers:
            self._accumulate_transition(call, _hidden(args, kwargs), output[0])
        if not call.restore_outputs or not isinstance(output, tuple) or output[1] is None:
            return None
        if call.compaction is not None:
            comp = call.compaction
            weights = scatter_attention(output[1], comp.index, comp.valid, comp.length, q_rows=(comp.index, comp.valid))
        elif call.layout is None and i in call.decode_columns:
            weights = scatter_attention(output[1], *call.decode_columns[i])
        else:
            return None
        return (output[0], weights, *output[2:])

    def _after_mlp(self, i: int, mlp, args, output):
        call = self._calls.get()
        if call is not None and call.layout is not None and i in call.transition_layers:
            self._accumulate_transition(call, args[0], output)

    # -- prefill steps --------------------------------------------------------------------------------
    def _current_key_mask(self, call: _Call) -> torch.Tensor | None:
        comp = call.compaction
        if comp is None:
            return call.key_mask
        mask = (
            call.key_mask if call.key_mask is not None else torch.ones_like(comp.valid[:, :1]).expand(-1, comp.length)
        )
        return comp.gather(mask, fill=False) & comp.valid

    def _to_original(self, call: _Call, scores: torch.Tensor) -> torch.Tensor:
        """(B, L') scores over the current sequence as (B, L) over original positions (0 where dropped)."""
        comp = call.compaction
        if comp is None:
            return scores
        out = scores.new_zeros(scores.shape[0], comp.length)
        return out.scatter_(1, comp.index, scores.masked_fill(~comp.valid, 0.0))

    def _row(self, call: _Call, position: int, length: int) -> int:
        """Current index of an original position after the last visual token (all such tokens stay, and
        samples stay right-aligned)."""
        original_length = call.layout.length
        return length - (original_length - position)

    def _score(self, call: _Call, layer, hidden, original: dict, drop_layer: int, signals) -> None:
        comp = call.compaction
        inputs = self._inputs(call, comp, original) if comp is not None else original
        pe, key_mask = inputs["position_embeddings"], self._current_key_mask(call)
        length = hidden.shape[1]
        last = call.score_row if call.score_row is not None else call.layout.length - 1
        out = call.signals.setdefault(drop_layer, {})
        if "last" in signals:
            scores = last_token_attention(self.query_key, layer, hidden, pe, self._row(call, last, length), key_mask)
            out["last"] = self._to_original(call, scores)
        if "instruction" in signals:
            rows = [torch.tensor([self._row(call, p, length) for p in r]) for r in self._instruction_rows(call, last)]
            scores = instruction_attention(self.query_key, layer, hidden, pe, rows, key_mask)
            out["instruction"] = self._to_original(call, scores)

    def _instruction_rows(self, call: _Call, last: int) -> list[list[int]]:
        """Per sample, the prompt positions after its last image (the instruction), else the last token."""
        rows = []
        for b, spans in enumerate(call.layout.spans):
            start = int(spans[-1][-1]) + 1 if spans else last
            r = [p for p in range(start, last + 1) if call.key_mask is None or bool(call.key_mask[b, p])]
            rows.append(r or [last])
        return rows

    def _accumulate_transition(self, call: _Call, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            weights = self._to_original(call, transition_variation(x, y, self._current_key_mask(call)))
        call.transition = weights if call.transition is None else call.transition + weights

    def _drop(self, call: _Call, i: int, hidden: torch.Tensor, cache) -> torch.Tensor:
        signals = call.signals.pop(i, {})
        if any("transition" in image.points[i][1].signals for image in call.images if i in image.points):
            length = call.layout.length
            signals["transition"] = (
                call.transition
                if call.transition is not None
                else hidden.new_zeros(len(call.layout.spans), length, dtype=torch.float32)
            )
        chosen = []
        for n, image in enumerate(call.images):
            if i not in image.points:
                chosen.append(image.present)
                continue
            point, pruner = image.points[i]
            if call.reuse is not None:
                image.present = call.reuse[i][n]
            elif point.keep < image.present.numel() or pruner.always_selects:
                image.present = image.present[self._select(pruner, image, point, signals)]
            image.counts.append((i, int(image.present.numel())))
            chosen.append(image.present)
        call.choices[i] = chosen
        per_sample = [
            [image.present for image in call.images if image.sample == b] for b in range(len(call.layout.spans))
        ]
        new = Compaction.from_keep(call.layout.keep_mask(per_sample, hidden.device))
        if new.is_identity:
            return hidden
        current = call.compaction
        if current is None:
            call.full_hidden = hidden
            relative = new.index
        else:
            call.full_hidden = current.scatter_into(call.full_hidden, hidden)
            relative = current.slots().gather(1, new.index).clamp_min(0)
        hidden = Compaction(index=relative, valid=new.valid, length=hidden.shape[1]).gather(hidden)
        call.compaction = new
        if cache is not None:
            if call.layer_compactions is None:
                call.layer_compactions = [None] * len(self.layers)
                self._caches[cache] = call.layer_compactions
            call.layer_compactions[i:] = [new] * (len(self.layers) - i)
        return hidden

    def _select(self, pruner: LLMPruner, image: _Image, point: DropPoint, signals: dict) -> torch.Tensor:
        positions = image.span[image.present]
        tokens = PromptTokens(
            keep=point.keep,
            positions=image.present,
            grid=image.grid,
            **{_FIELDS[s]: signals[s][image.sample, positions] for s in pruner.signals},
        )
        idx = pruner.select(tokens)
        n = image.present.numel()
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"the {pruner.name!r} pruner's select() must return a 1-D integer tensor, got {idx!r}")
        idx = idx.to(image.present.device, torch.long)
        if (
            idx.numel() > point.keep
            or (idx.numel() and (idx.min() < 0 or idx.max() >= n))
            or bool((idx[1:] <= idx[:-1]).any())
        ):
            raise ValueError(
                f"the {pruner.name!r} pruner's select() must return at most {point.keep} ascending, distinct "
                f"indices in [0, {n}), got {idx.tolist()}"
            )
        return idx

    def _inputs(self, call: _Call, comp: Compaction, original: dict) -> dict:
        """The layer kwargs for the tokens ``comp`` keeps, converted once per call and compaction."""
        out = {
            "position_embeddings": self._convert(
                call, original["position_embeddings"], comp, lambda pe: tuple(comp.gather(t) for t in pe)
            )
        }
        if original.get("position_ids") is not None:
            out["position_ids"] = self._convert(call, original["position_ids"], comp, comp.gather)
        out["attention_mask"] = self._convert(
            call,
            original.get("attention_mask"),
            comp,
            lambda m: compact_mask(
                m,
                q_index=comp.index,
                q_valid=comp.valid,
                kv_index=comp.index,
                kv_valid=comp.valid,
                q_len=comp.length,
                kv_len=comp.length,
                flash=self.flash,
            ),
        )
        return out

    def _convert(self, call: _Call, value, comp: Compaction, fn):
        key = (id(value), id(comp))
        if key not in call.converted:
            # Holding both keeps their ids from being reused by new objects during the call.
            call.converted[key] = (value, comp, fn(value))
        return call.converted[key][2]

    def _stats(self, call: _Call) -> PruneStats:
        n_layers = len(self.layers)
        spans = call.layout.spans
        kept = call.layout.sample_kept(
            [[im.present for im in call.images if im.sample == b] for b in range(len(spans))]
        )
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
        return PruneStats(kept=kept, layer_tokens=layer_tokens, drops=drops)


_FIELDS = {"last": "attention", "instruction": "instruction_attention", "transition": "transition"}


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs
