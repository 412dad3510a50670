"""The LLM stage: drop visual tokens inside the decoder at the drop points of a schedule.

A forward pre-hook on every decoder layer rewrites what the layer receives. At a drop point the
pruner scores the visual tokens still present and the hidden states are compacted again; every layer
after the first drop gets the position embeddings, position ids and mask columns of the tokens still
present, gathered from the model's own (full-length) ones, so kept tokens keep their original
positions and each layer's KV cache holds exactly the tokens that entered it. The compaction of each
layer (``CallState.layer_compactions``) goes to the decode stage (``core/decode_stage.py``), which maps
decode steps onto those shorter caches.

A forward hook writes the kept tokens' outputs back into a full-length sequence, where dropped
tokens carry the hidden state they had when they were dropped, so outputs keep their usual shape:
on the last layer always, and on every pruned layer (and its attention weights) when the call asks
for hidden states or attentions.

Per-call state is kept per thread, so one model can serve several threads at once.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager

import torch
from torch import nn

from vtprune.core.compaction import Compaction, scatter_attention
from vtprune.core.decoder import DecoderAccess
from vtprune.core.layout import VisualLayout
from vtprune.core.llm_call import CallState, ImageState, LLMPruner, call_stats, plan
from vtprune.core.llm_signals import HIDDEN, RATERS, SIGNALS, TOWER, TRANSITION, ScoringInput, text_raters
from vtprune.core.masks import compact_mask
from vtprune.core.patching import PerThread
from vtprune.core.stats import PruneStats
from vtprune.core.tokens import ModelInfo, PromptTokens, Reduction, SampleTokens
from vtprune.ops import transition_variation


class LLMStage:
    def __init__(
        self,
        pruners: list[LLMPruner],
        layers: nn.ModuleList,
        info: ModelInfo,
        decoder: DecoderAccess,
        flash: bool,
    ):
        self.pruners = pruners
        self.layers = layers
        self.info = info
        self.decoder = decoder
        self.flash = flash
        self._calls = PerThread()
        self.last: PruneStats | None = None

    def install(self) -> list:
        handles = []
        for i, layer in enumerate(self.layers):
            attention, mlp = self.decoder.sublayers(layer)
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
        tower: list | None = None,
        score_row: int | None = None,
        reuse: dict | None = None,
        restore_outputs: bool = False,
    ):
        """Scope one model forward; ``layout`` None for calls without images. ``grids``: the patch grid
        (or None) of each image in layout order; ``tower``: each image's (N_i,) tower CLS attention
        over its tokens entering the LLM (signal ``"tower"``), or None. ``reuse`` repeats an earlier call's ``choices``
        instead of scoring again (the full forwards of ``generate(use_cache=False)``)."""
        has_images = layout is not None and layout.has_images
        state = CallState(
            layout=layout if has_images else None,
            key_mask=key_mask,
            score_row=score_row,
            reuse=reuse,
            restore_outputs=restore_outputs,
        )
        if has_images:
            plan(state, self.pruners, self.info, grids, tower)
        with self._calls.set(state) as call:
            yield call
            if call.layout is not None:
                call.stats = self.last = call_stats(state, len(self.layers))

    # -- hooks -------------------------------------------------------------------------------------
    def _before(self, i: int, layer, args, kwargs):
        call = self._calls.get()
        if call is None or call.layout is None:
            return None
        hidden = _hidden(args, kwargs)
        original = {k: kwargs.get(k) for k in ("position_embeddings", "position_ids", "attention_mask")}
        if i == 0 and any(RATERS in p.signals for p in self.pruners):
            call.raters = self._raters(call, hidden)
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
        if call.compaction is None:
            return None
        comp = call.compaction
        weights = scatter_attention(output[1], comp.index, comp.valid, comp.length, q_rows=(comp.index, comp.valid))
        return (output[0], weights, *output[2:])

    def _after_mlp(self, i: int, mlp, args, output):
        call = self._calls.get()
        if call is not None and call.layout is not None and i in call.transition_layers:
            self._accumulate_transition(call, args[0], output)

    # -- prefill steps --------------------------------------------------------------------------------
    def _current_key_mask(self, call: CallState) -> torch.Tensor | None:
        comp = call.compaction
        if comp is None:
            return call.key_mask
        mask = (
            call.key_mask if call.key_mask is not None else torch.ones_like(comp.valid[:, :1]).expand(-1, comp.length)
        )
        return comp.gather(mask, fill=False) & comp.valid

    def _to_original(self, call: CallState, scores: torch.Tensor) -> torch.Tensor:
        """(B, L') scores over the current sequence as (B, L) over original positions (0 where dropped)."""
        comp = call.compaction
        if comp is None:
            return scores
        out = scores.new_zeros(scores.shape[0], comp.length)
        return out.scatter_(1, comp.index, scores.masked_fill(~comp.valid, 0.0))

    def _score(self, call: CallState, layer, hidden, original: dict, drop_layer: int, signals) -> None:
        comp = call.compaction
        inputs = self._inputs(call, comp, original) if comp is not None else original
        last = call.last
        scoring = ScoringInput(
            decoder=self.decoder,
            layer=layer,
            hidden=hidden,
            position_embeddings=inputs["position_embeddings"],
            key_mask=self._current_key_mask(call),
            last=last,
            length=call.layout.length,
            instruction_starts=[end + 1 if end >= 0 else last for end in call.layout.ends],
            prompt_mask=call.key_mask,
            raters=call.raters,
        )
        out = call.signals.setdefault(drop_layer, {})
        for name in signals:
            compute = SIGNALS[name].compute
            if compute is not None:
                out[name] = self._to_original(call, compute(scoring))

    def _raters(self, call: CallState, embeddings: torch.Tensor) -> list[torch.Tensor]:
        """Per sample, the positions of its text raters, from the decoder's input embeddings (B, L, D)."""
        last = call.last
        out = []
        for b, spans in enumerate(call.layout.spans):
            instruction = call.instruction(b, embeddings.device)
            if not spans or not instruction.numel():
                out.append(instruction if instruction.numel() else torch.tensor([last], device=embeddings.device))
                continue
            with torch.no_grad():
                out.append(text_raters(embeddings[b], torch.cat(spans).to(embeddings.device), instruction))
        return out

    def _accumulate_transition(self, call: CallState, x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.no_grad():
            weights = self._to_original(call, transition_variation(x, y, self._current_key_mask(call)))
        call.transition = weights if call.transition is None else call.transition + weights

    def _drop(self, call: CallState, i: int, hidden: torch.Tensor, cache) -> torch.Tensor:
        signals = call.signals.pop(i, {})
        if any(TRANSITION in image.points[i][1].signals for image in call.images if i in image.points):
            length = call.layout.length
            signals[TRANSITION] = (
                call.transition
                if call.transition is not None
                else hidden.new_zeros(len(call.layout.spans), length, dtype=torch.float32)
            )
        chosen, recycling = [], []
        together = {} if call.reuse is not None else self._reduce_together(call, i, signals, hidden)
        for n, image in enumerate(call.images):
            groups = together.get(n, [])
            if i in image.points:
                point, pruner = image.points[i]
                if call.reuse is not None:
                    groups = call.reuse[1][i][n]
                    _regroup(image, call.reuse[0][i][n], groups)
                elif not pruner.joint and (point.keep < image.present.numel() or pruner.always_selects):
                    tokens = self._prompt_tokens(pruner, image, point.keep, signals, hidden, call.compaction)
                    groups = _apply(image, _checked_reduction(pruner, pruner.reduce(tokens), len(tokens), point.keep))
                image.counts.append((i, int(image.present.numel())))
            chosen.append(image.present)
            recycling.append(groups)
        call.choices[i], call.recycled[i] = chosen, recycling
        per_sample = [
            [image.present for image in call.images if image.sample == b] for b in range(len(call.layout.spans))
        ]
        new = Compaction.from_keep(call.layout.keep_mask(per_sample, hidden.device))
        if new.is_identity:
            return hidden
        current = call.compaction
        before = hidden
        if current is None:
            call.full_hidden = hidden
            relative = new.index
        else:
            call.full_hidden = current.scatter_into(call.full_hidden, hidden)
            relative = current.slots().gather(1, new.index).clamp_min(0)
        hidden = Compaction(index=relative, valid=new.valid, length=hidden.shape[1]).gather(hidden)
        if any(recycling):
            hidden = self._recycle(call.images, recycling, before, current, new, hidden)
        call.compaction = new
        if cache is not None:
            if call.layer_compactions is None:
                call.layer_compactions = [None] * len(self.layers)
            call.layer_compactions[i:] = [new] * (len(self.layers) - i)
        return hidden

    def _prompt_tokens(
        self, pruner: LLMPruner, image: ImageState, keep: int, signals: dict, hidden: torch.Tensor, comp
    ) -> PromptTokens:
        """The image's tokens still present, with the signals ``pruner`` reads, for a drop keeping ``keep``."""
        positions = image.span[image.present]
        computed = [s for s in pruner.signals if s not in (TOWER, HIDDEN)]
        read = {SIGNALS[s].field: signals[s][image.sample, positions] for s in computed}
        if TOWER in pruner.signals:
            read[SIGNALS[TOWER].field] = image.tower[image.present.to(image.tower.device)]
        if HIDDEN in pruner.signals:  # the states entering the drop layer, laid out by ``comp``
            read[SIGNALS[HIDDEN].field] = _rows_of(hidden, image.sample, positions, comp)
        entered = image.span.numel()
        return PromptTokens(keep=keep, positions=image.present, grid=image.grid, entered=entered, **read)

    def _reduce_together(self, call: CallState, i: int, signals: dict, hidden: torch.Tensor) -> dict:
        """The drops of ``joint`` pruners at layer ``i``: per sample, its images ranked together. Returns
        the recycled groups of each image that dropped (by its index in ``call.images``)."""
        out = {}
        for b in range(len(call.layout.spans)):
            members = [(n, image) for n, image in enumerate(call.images) if image.sample == b]
            dropping = [n for n, image in members if i in image.points and image.points[i][1].joint]
            if not dropping:
                continue
            pruner = call.images[dropping[0]].points[i][1]
            keep = sum(call.images[n].points[i][0].keep for n in dropping)
            if keep >= sum(call.images[n].present.numel() for n in dropping) and not pruner.always_selects:
                continue
            tokens = [
                self._prompt_tokens(
                    pruner,
                    image,
                    image.points[i][0].keep if n in dropping else image.present.numel(),
                    signals,
                    hidden,
                    call.compaction,
                )
                for n, image in members
            ]
            text = None
            if HIDDEN in pruner.signals:
                text = _rows_of(hidden, b, call.instruction(b, hidden.device), call.compaction)
            sample = SampleTokens(tokens, [n in dropping for n, _ in members], keep, text)
            answers = _checked_sample(pruner, pruner.reduce_sample(sample), sample)
            out.update({n: _apply(image, r) for (n, image), r in zip(members, answers) if n in dropping})
        return out

    def _recycle(self, images, recycling, before, current, new, hidden) -> torch.Tensor:
        """Each recycled token, the (weighted) mean of its members' hidden states before the drop
        (``before``, laid out by ``current``), written at its anchor's slot of ``hidden`` (laid out by
        ``new``)."""
        hidden = hidden.clone()
        old_slots = None if current is None else current.slots()
        new_slots = new.slots()
        for image, groups in zip(images, recycling):
            b = image.sample
            for members, weights in groups:
                original = image.span[members]
                rows = original if old_slots is None else old_slots[b, original]
                x = before[b, rows.to(before.device)].float()
                w = torch.ones(len(members), device=x.device) if weights is None else weights.to(x.device)
                merged = (w[:, None] * x).sum(0) / w.sum().clamp_min(1e-12)
                hidden[b, new_slots[b, original[0]]] = merged.to(hidden.dtype)
        return hidden

    def _inputs(self, call: CallState, comp: Compaction, original: dict) -> dict:
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

    def _convert(self, call: CallState, value, comp: Compaction, fn):
        key = (id(value), id(comp))
        if key not in call.converted:
            # Holding both keeps their ids from being reused by new objects during the call.
            call.converted[key] = (value, comp, fn(value))
        return call.converted[key][2]


def _rows_of(hidden: torch.Tensor, b: int, positions: torch.Tensor, comp) -> torch.Tensor:
    """(n, D) sample ``b``'s hidden states at original ``positions``, ``hidden`` laid out by ``comp``."""
    rows = positions if comp is None else comp.slots()[b, positions]
    return hidden[b, rows.to(hidden.device)]


def _apply(image: ImageState, r: Reduction) -> list:
    """``r`` (indices into the image's present tokens) applied to ``image``; returns its recycled
    groups as [(members, weights or None)], members (g,) indices into the image's tokens, anchor first."""
    groups = [(image.present[g], None if not r.weights else r.weights[j].float()) for j, g in enumerate(r.groups)]
    staying = torch.cat([r.kept, r.anchors.to(r.kept.device)]).sort().values if r.groups else r.kept
    _regroup(image, image.present[staying], groups)
    return groups


def _checked_sample(pruner: LLMPruner, answers, sample: SampleTokens) -> list[Reduction]:
    """A joint pruner's answer: one Reduction per image, every token kept of the images not dropping,
    the dropping ones within the shared budget; or a clear error."""
    if not isinstance(answers, (list, tuple)) or len(answers) != len(sample.images):
        raise TypeError(
            f"the {pruner.name!r} pruner's reduce_sample() must return one Reduction per image "
            f"({len(sample.images)}), got {answers!r}"
        )
    out = [_checked_reduction(pruner, r, len(t), len(t)) for r, t in zip(answers, sample.images)]
    for r, tokens, dropping in zip(out, sample.images, sample.dropping):
        if not dropping and (r.groups or r.kept.numel() != len(tokens)):
            raise ValueError(
                f"the {pruner.name!r} pruner's reduce_sample() dropped tokens of an image that does not drop here"
            )
    total = sum(r.kept.numel() + len(r.groups) for r, dropping in zip(out, sample.dropping) if dropping)
    if total > sample.keep:
        raise ValueError(
            f"the {pruner.name!r} pruner's reduce_sample() kept {total} tokens of the images dropping here; "
            f"their budget is {sample.keep}"
        )
    return out


def _regroup(image: ImageState, present: torch.Tensor, groups: list) -> None:
    """``image.present`` becomes ``present``; ``image.groups`` follows: recycled tokens that stay keep
    their groups, new ones stand for everything behind their members (a recycled token recycled again
    included)."""
    behind = {int(m[0]): torch.cat([image.groups.get(int(t), t[None]) for t in m]) for m, _ in groups}
    alone = set(present.tolist()) - set(behind)
    image.groups = {a: g for a, g in image.groups.items() if a in alone}
    image.groups.update(behind)
    image.present = present


def _checked_reduction(pruner: LLMPruner, r, n: int, keep: int) -> Reduction:
    """The pruner's answer as a Reduction, or a clear error when it is not one of ``n`` tokens to at most
    ``keep`` (kept and recycled together)."""
    r = Reduction(r) if isinstance(r, torch.Tensor) else r
    kept = r.kept if isinstance(r, Reduction) else r
    if not isinstance(kept, torch.Tensor) or kept.dim() != 1 or kept.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"the {pruner.name!r} pruner's select() must return a 1-D integer tensor, got {kept!r}")
    r = Reduction(kept.long(), tuple(g.long() for g in r.groups), r.weights)
    weights_fit = not r.weights or (
        len(r.weights) == len(r.groups) and all(w.shape == g.shape for w, g in zip(r.weights, r.groups))
    )
    if not r.fits(n, keep) or not weights_fit:
        raise ValueError(
            f"the {pruner.name!r} pruner's select() must return at most {keep} ascending, distinct "
            f"indices in [0, {n}) (recycled groups counted, disjoint from them, one weight per member), got "
            f"{r.kept.tolist()} and {len(r.groups)} recycled groups"
        )
    return r


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _replace_hidden(args, kwargs, hidden):
    if args:
        return (hidden, *args[1:]), kwargs
    kwargs["hidden_states"] = hidden
    return args, kwargs
