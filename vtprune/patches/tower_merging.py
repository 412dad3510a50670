"""A tower-stage pruner inside a VLM's transformers vision tower (CLIP, SigLIP, DINOv2).

The encoder layers up to the last one whose output the VLM selects (``vision_feature_layer``) have
their ``forward`` shadowed for the duration (``MethodPatch``): each runs its own sub-modules in its
own order (``TowerSpec.merging_layer``), with the proportional-attention term as the attention mask
its attention adds, and merges after the attention residual (the keys, read by a forward hook on the
attention's key projection, compared) or, for pruners that merge a block's output (MustDrop, AIM),
after the layer (its hidden states, or the keys the next layer would compute from them, compared).
Layers after the selected one merge nothing.

At the tower's exit the merged tokens go back on the patch grid: every tensor of per-token rows the
tower returns (``last_hidden_state``, ``hidden_states``) has each patch carry the token it was merged
into (``TowerStage.restore``). The model's own code after the tower (feature selection, projector,
LLaVA-NeXT's packing) then runs as without pruning; which patches share a token travels to the vision
stage as ids (``TowerStage.token_ids``), and there each merged token enters the language model once.
Patches a pruner dropped (Zero-TPrune) hold zeros and have id -1: they enter as no token. On video
frames the model pools after the tower, ``keep`` counts the pooled frame's tokens (``counting_on``) and
the family's pooling is replaced by the tokens themselves (``vtprune.core.video_frames``). For pruners
that read attention probabilities, a hook on the query projection keeps the queries until the keys
come.
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from vtprune.core.patching import MethodPatch, PerThread
from vtprune.core.tower_signals import TowerSignals
from vtprune.core.tower_stage import TowerRun, TowerStage
from vtprune.patches.tower_spec import TowerSpec
from vtprune.patches.towers import tower_name, tower_spec


def check_tower_merging(pruner, tower: torch.nn.Module, model_name: str, blocks: int, no_drops: str = "") -> None:
    """Raise ValueError unless ``pruner`` can merge in ``tower``'s first ``blocks`` layers; ``no_drops``:
    why the family cannot take patches dropped inside the tower ("" if it can)."""
    spec = tower_spec(tower)
    if spec is None or spec.merging_layer is None:
        why = spec.no_merging if spec is not None else "vtprune does not know its encoder layers"
        raise ValueError(
            f"the {pruner.name!r} pruner merges tokens inside the vision tower, which it cannot do in "
            f"{tower_name(tower)} ({model_name}): {why}"
        )
    if pruner.drops and no_drops:
        raise ValueError(
            f"the {pruner.name!r} pruner drops patches inside the vision tower, which {model_name} cannot "
            f"take: {no_drops}"
        )
    impl = tower.config._attn_implementation or "eager"
    if getattr(pruner, "proportional", False) and ("flash" in impl or "flex" in impl):
        raise ValueError(
            f"the {pruner.name!r} pruner adds log(size) to the tower's attention (proportional attention), "
            f"which attn_implementation={impl!r} cannot take; use sdpa or eager, or proportional=False"
        )
    if spec.grid_from_config:  # keep reachable? (otherwise the first forward tells, on its real grid)
        config = tower.config
        pruner.merge_plan((config.image_size // config.patch_size) ** 2, int(spec.has_cls), blocks)


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


@dataclass
class _Call:
    """One tower forward in flight; its run starts at the first layer, when the tokens are known."""

    run: TowerRun | None = None
    queries: torch.Tensor | None = None  # the current layer's, for pruners that read attention


class TowerMerging:
    """Install a tower-stage pruner on ``tower``; ``blocks``: the layers 0..blocks-1 may merge."""

    def __init__(self, tower: torch.nn.Module, spec: TowerSpec, pruner, blocks: int):
        self.tower = tower
        self.spec = spec
        self.stage = TowerStage(pruner, blocks, int(spec.has_cls), len(spec.layers(tower)))
        self._calls = PerThread()
        self._finished = PerThread()
        self._counted_on = PerThread()

    def install(self) -> list:
        layers = self.spec.layers(self.tower)
        undo = [MethodPatch(self.tower, "forward", self._tower_forward).undo]
        try:
            for index in range(self.stage.blocks):
                undo.append(MethodPatch(layers[index], "forward", functools.partial(self._layer_forward, index)).undo)
                attention = getattr(layers[index], self.spec.attention)
                hook = functools.partial(self._read_keys, attention)
                undo.append(getattr(attention, self.spec.key).register_forward_hook(hook).remove)
                if self.stage.pruner.reads_attention:
                    hook = functools.partial(self._read_queries, attention)
                    undo.append(getattr(attention, self.spec.query).register_forward_hook(hook).remove)
        except Exception:
            for step in reversed(undo):
                step()
            raise
        return undo

    @contextmanager
    def collecting(self):
        """The runs of the tower forwards in this thread (those that merged), in call order."""
        with self._finished.set([]) as runs:
            yield runs

    @contextmanager
    def counting_on(self, tokens: int):
        """Tower forwards in this thread whose ``keep`` counts ``tokens`` per tower input rather than
        its patches (video frames pooled after the tower to that many tokens)."""
        with self._counted_on.set(tokens):
            yield

    def last_token_ids(self) -> torch.Tensor | None:
        """(inputs, tokens) the merged-token ids (``TowerStage.token_ids``) of this thread's last tower
        forward within ``collecting``, None when it merged nothing."""
        runs = self._finished.get()
        return self.stage.token_ids(runs[-1]) if runs else None

    def signals(self, read: dict, runs: list, model_name: str) -> TowerSignals:
        """What the pruners read in the tower (``TowerReader``'s ``read``), on the patch grid, with the
        merged-token ids of the one tower forward that merged (``runs``, from ``collecting``)."""
        if len(runs) > 1:
            raise NotImplementedError(
                f"{model_name} ran its vision tower {len(runs)} times for one set of images; vtprune's tower "
                f"stage follows one tower call per encoding"
            )
        stage, run = self.stage, runs[0]
        scores = [stage.restore(run, t) for t in read["scores"]]
        keys = [stage.restore(run, t) for t in read["keys"]]
        return TowerSignals.of(scores, keys, stage.token_ids(run))

    def _tower_forward(self, original, *args, **kwargs):
        with self._calls.set(_Call()) as call:
            out = original(*args, **kwargs)
        run = call.run
        if run is None or not run.merged:
            return out
        out.last_hidden_state = self.stage.restore(run, out.last_hidden_state)
        if getattr(out, "hidden_states", None) is not None:
            out.hidden_states = tuple(h if h is None else self.stage.restore(run, h) for h in out.hidden_states)
        finished = self._finished.get()
        if finished is not None:
            finished.append(run)
        return out

    def _read_queries(self, attention, _module, _inputs, queries: torch.Tensor) -> None:
        call = self._calls.get()
        if call is not None and call.run is not None:
            call.queries = queries

    def _read_keys(self, attention, _module, _inputs, keys: torch.Tensor) -> None:
        call = self._calls.get()
        if call is None or call.run is None:
            return
        batch, n = keys.shape[:2]
        heads = keys.view(batch, n, -1, attention.head_dim)
        call.run.metric = heads.mean(2)  # ToMe's metric: keys averaged over heads
        if call.queries is not None:  # the probabilities fused attention never forms (Zero-TPrune reads them)
            q = call.queries.view(batch, n, -1, attention.head_dim).transpose(1, 2)
            scale = getattr(attention, "scale", None) or getattr(attention, "scaling", None)
            call.run.attention = ((q @ heads.permute(0, 2, 3, 1)) * scale).float().softmax(-1)
            call.queries = None

    def _layer_forward(self, index: int, original, hidden_states, attention_mask=None, **kwargs):
        call = self._calls.get()
        if call is None:  # a layer called outside the tower's forward: as unpatched
            return original(hidden_states, attention_mask, **kwargs)
        stage = self.stage
        if call.run is None:
            call.run = stage.start(hidden_states.shape[1] - stage.protected, self._counted_on.get())
        run = call.run
        stage.enter(run, hidden_states)
        bias = stage.attention_bias(run, hidden_states.dtype)
        if bias is not None and attention_mask is not None:
            raise NotImplementedError(
                f"{type(self.tower).__name__} was called with an attention mask: merging tokens inside it "
                f"supports unmasked towers only"
            )
        layer = self.spec.layers(self.tower)[index]
        mask = attention_mask if bias is None else bias
        if stage.pruner.merges_after == "block":  # merge the layer's output, comparing its hidden states
            out = self.spec.merging_layer(layer, hidden_states, mask, kwargs, _unchanged)
            return stage.merge(run, index, out, self._block_metric(index, out))
        merge = functools.partial(self._merge, run, index)
        return self.spec.merging_layer(layer, hidden_states, mask, kwargs, merge)

    def _block_metric(self, index: int, out: torch.Tensor) -> torch.Tensor:
        """What a block merging after its output compares (``TowerPruner.block_metric``)."""
        layers = self.spec.layers(self.tower)
        if self.stage.pruner.block_metric != "next_keys" or index + 1 >= len(layers):
            return out
        following = layers[index + 1]
        key = getattr(getattr(following, self.spec.attention), self.spec.key)
        with torch.no_grad():  # .forward: the keys of a layer that has not run yet, unseen by key readers
            return key.forward(getattr(following, self.spec.norm)(out))

    def _merge(self, run: TowerRun, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.stage.merge(run, index, x, run.metric)  # the metric the layer's attention just read
