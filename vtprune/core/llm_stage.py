"""The LLM stage: drop visual tokens inside the decoder, before layer K, keeping original positions.

Forward pre-hooks on the decoder layers rewrite what each layer >= K receives (hidden states at K,
then masks, position embeddings and position ids), so the dropped tokens never enter those layers'
KV cache. A forward hook writes the kept tokens' outputs back into a full-length sequence, where
dropped tokens carry the hidden state they had when they were dropped, so outputs keep their usual
shape: on the last layer always, and on every pruned layer (and its attention weights) when the
call asks for hidden states or attentions. Decode steps reuse the compaction stored for their cache.

Per-call state is kept per thread, so one model can serve several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from vtprune.core.cache_state import CacheState
from vtprune.core.compaction import Compaction, scatter_attention
from vtprune.core.layout import VisualLayout
from vtprune.core.masks import compact_mask
from vtprune.core.patching import PerThread
from vtprune.ops import attention_rows
from vtprune.pruners.base import LLMPruner, PromptTokens
from vtprune.stats import PruneStats

QueryKeyFn = Callable[[nn.Module, torch.Tensor, tuple, torch.Tensor], tuple]


@dataclass
class _Call:
    """State of one forward call through the decoder."""

    layout: VisualLayout | None  # None: no images in this call (decode step or text only)
    key_mask: torch.Tensor | None  # (B, L) bool padding mask of the prompt
    score_row: int | None = None  # position of the scoring query (the last prompt token); None: the last one
    restore_outputs: bool = False  # the caller collects every layer's hidden states or attention weights
    kept: list | None = None  # kept[b][i]: indices into image i of sample b; preset to reuse a choice
    scores: torch.Tensor | None = None  # (B, L) attention from the scoring row at layer K-1
    compaction: Compaction | None = None
    full_hidden: torch.Tensor | None = None
    decode_columns: tuple | None = None  # decode steps: (kv_index, kv_valid, kv_len) of the pruned layers
    converted: dict = field(default_factory=dict)  # id(original kwarg) -> (original, converted)


class LLMStage:
    def __init__(self, pruner: LLMPruner, layers: nn.ModuleList, query_key: QueryKeyFn, flash: bool):
        self.pruner = pruner
        self.layers = layers
        self.query_key = query_key
        self.flash = flash
        self._calls = PerThread()
        self._caches = CacheState("llm_stage")
        self.last: PruneStats | None = None

    def install(self) -> list:
        k = self.pruner.layer
        pruned = self.layers[k:]
        handles = [self.layers[k - 1].register_forward_pre_hook(self._score, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(self._prune, with_kwargs=True) for layer in pruned]
        # Prepended so that output-capturing hooks (transformers installs them on the first forward,
        # possibly before vtprune) see the restored full-length tensors.
        handles += [layer.register_forward_hook(self._restore_length, prepend=True) for layer in pruned]
        handles += [layer.self_attn.register_forward_hook(self._restore_attention, prepend=True) for layer in pruned]
        return handles

    @contextmanager
    def call(
        self,
        layout: VisualLayout | None,
        key_mask: torch.Tensor | None,
        *,
        score_row: int | None = None,
        kept: list | None = None,
        restore_outputs: bool = False,
    ):
        """Scope one model forward; ``layout`` None for calls without images. ``kept`` reuses an
        earlier choice instead of scoring again (full forwards of ``generate(use_cache=False)``)."""
        has_images = layout is not None and layout.has_images
        state = _Call(
            layout=layout if has_images else None,
            key_mask=key_mask,
            score_row=score_row,
            kept=kept if has_images else None,
            restore_outputs=restore_outputs,
        )
        with self._calls.set(state) as call:
            yield call
            if call.layout is not None and call.kept is not None:
                self.last = self._stats(call)

    # -- hooks -------------------------------------------------------------------------------------
    def _score(self, layer, args, kwargs):
        call = self._calls.get()
        if call is None or call.layout is None or call.kept is not None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        row = hidden.shape[1] - 1 if call.score_row is None else call.score_row
        row = torch.tensor([row], device=hidden.device)
        with torch.no_grad():
            q, k, scale = self.query_key(layer, hidden, kwargs["position_embeddings"], row)
            call.scores = attention_rows(q, k, row, key_mask=call.key_mask, scale=scale)[:, 0]
        return

    def _prune(self, layer, args, kwargs):
        call = self._calls.get()
        if call is None:
            return None
        if call.layout is not None:
            if call.compaction is None:
                args, kwargs = self._compact_hidden(args, kwargs)
            elif call.restore_outputs and not call.compaction.is_identity:
                args, kwargs = _replace_hidden(args, kwargs, call.compaction.gather(_hidden(args, kwargs)))
            comp = call.compaction
            if comp.is_identity:
                return None
            q_index, q_valid, kv_index, kv_valid = comp.index, comp.valid, comp.index, comp.valid
            q_len = kv_len = comp.length
            kwargs["position_embeddings"] = self._convert(
                kwargs["position_embeddings"], lambda pe: tuple(comp.gather(t) for t in pe)
            )
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = self._convert(kwargs["position_ids"], comp.gather)
        else:
            comp = self._caches.get(kwargs.get("past_key_values"))
            if comp is None:
                return None
            mask = kwargs.get("attention_mask")
            q_len = _hidden(args, kwargs).shape[1]
            kv_len = mask.shape[-1] if mask is not None else kwargs["past_key_values"].get_seq_length(0)
            q_index = q_valid = None
            kv_index, kv_valid = comp.key_columns(kv_len)
            call.decode_columns = (kv_index, kv_valid, kv_len)
        kwargs["attention_mask"] = self._convert(
            kwargs.get("attention_mask"),
            lambda m: compact_mask(
                m, q_index=q_index, q_valid=q_valid, kv_index=kv_index, kv_valid=kv_valid,
                q_len=q_len, kv_len=kv_len, flash=self.flash,
            ),
        )
        return args, kwargs

    def _restore_length(self, layer, args, output):
        call = self._calls.get()
        if call is None or call.compaction is None or call.compaction.is_identity:
            return None
        if layer is not self.layers[-1] and not call.restore_outputs:
            return None
        return call.compaction.scatter_into(call.full_hidden, output)

    def _restore_attention(self, attention, args, output):
        call = self._calls.get()
        if call is None or not call.restore_outputs or not isinstance(output, tuple) or output[1] is None:
            return None
        if call.compaction is not None and not call.compaction.is_identity:
            comp = call.compaction
            weights = scatter_attention(output[1], comp.index, comp.valid, comp.length, q_rows=(comp.index, comp.valid))
        elif call.layout is None and call.decode_columns is not None:
            weights = scatter_attention(output[1], *call.decode_columns)
        else:
            return None
        return (output[0], weights, *output[2:])

    # -- helpers -----------------------------------------------------------------------------------
    def _convert(self, value, fn):
        """Convert a kwarg shared by all layers once per call."""
        converted = self._calls.get().converted
        key = id(value)
        if key not in converted:
            converted[key] = (value, fn(value))
        return converted[key][1]

    def _compact_hidden(self, args, kwargs):
        call = self._calls.get()
        hidden = _hidden(args, kwargs)
        if call.kept is None:
            if call.scores is None:
                raise RuntimeError("vtprune: the scoring layer did not run before the pruning layer")
            call.kept = [
                [self.pruner.select(PromptTokens(attention=call.scores[b, span])) for span in images]
                for b, images in enumerate(call.layout.spans)
            ]
        keep = call.layout.keep_mask(call.kept, hidden.device)
        call.compaction = comp = Compaction.from_keep(keep)
        if comp.is_identity:
            return args, kwargs
        cache = kwargs.get("past_key_values")
        if cache is not None:
            self._caches[cache] = comp
        call.full_hidden = hidden
        return _replace_hidden(args, kwargs, comp.gather(hidden))

    def _stats(self, call: _Call) -> PruneStats:
        k, n = self.pruner.layer, len(self.layers)
        before = call.layout.visual_counts()
        kept = call.layout.sample_kept(call.kept)
        return PruneStats(
            kept=kept,
            layer_tokens=[[v] * k + [int(t.numel())] * (n - k) for v, t in zip(before, kept)],
        )


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs
