"""The tower stage: tokens merged between the attention and the MLP of vision-tower blocks.

A family adapter calls, per tower forward: ``start()`` before the first block, then in each block
``attention_bias(run)`` (the proportional-attention term for its attention) and, after the attention
residual, ``merge(run, block, x, metric)``; ``stats(run)`` after the last block. The stage knows no
model class: a block is a number, tokens are (B, N, D) tensors whose first ``protected`` tokens (CLS,
registers) are never merged, and the metric is what the pruner compares (ToMe: keys averaged over
heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from vtprune.core.stats import PruneStats
from vtprune.ops.bipartite import merge_origin, merge_weighted, proportional_bias, unmerge

_EXACT_IDS = 2**24  # token ids travel with the tower signals in fp32, exact below this


class TowerMerging(Protocol):
    """What a tower-stage pruner must offer the stage (``vtprune.pruners.base.TowerPruner``)."""

    proportional: bool
    exact_plan: bool
    size_weighted: bool

    def merge_plan(self, patches: int, protected: int, blocks: int, counted_on: int | None = None) -> list[int]: ...

    def most_merges(self, n: int, protected: int) -> int: ...

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None): ...


@dataclass
class TowerRun:
    """One tower forward in flight: ``size`` (B, N) patches per token (None until the first merge),
    ``origin`` (B, P) the token each of the P patches now belongs to, ``layer_tokens`` the patch tokens
    entering each block so far, ``metric`` (B, N, C) what the current block's merge compares;
    ``origins`` the ``origin`` after each merging block, by the number of tokens it left; ``attention``
    (B, H, N, N) the current block's attention probabilities where the pruner reads them. Dropped
    patches (pruners that drop, e.g. Zero-TPrune) have origin -1."""

    plan: list[int]
    size: torch.Tensor | None = None
    origin: torch.Tensor | None = None
    layer_tokens: list[int] = field(default_factory=list)
    metric: torch.Tensor | None = None  # the current block's, as the adapter read it
    attention: torch.Tensor | None = None  # (B, H, N, N) the block's attention, for pruners that read it
    origins: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def merged(self) -> bool:
        return self.size is not None


class TowerStage:
    """``blocks``: the tower's first blocks, those that may merge; ``layers``: all its blocks (default
    ``blocks``), for pruners whose rule changes with depth."""

    def __init__(self, pruner: TowerMerging, blocks: int, protected: int, layers: int | None = None):
        self.pruner = pruner
        self.blocks = blocks
        self.protected = protected
        self.layers = blocks if layers is None else layers

    def start(self, patches: int, counted_on: int | None = None) -> TowerRun:
        """A run over ``patches`` patch tokens; ``counted_on``: the tokens ``keep`` counts when they are
        not the patches (a frame the model pools after the tower)."""
        return TowerRun(self.pruner.merge_plan(patches, self.protected, self.blocks, counted_on))

    def enter(self, run: TowerRun, x: torch.Tensor) -> None:
        """Record the tokens entering the next block (x: (B, N, D))."""
        if run.origin is None:
            batch, n = x.shape[:2]
            run.origin = torch.arange(self.protected, n, device=x.device).expand(batch, n - self.protected)
        run.layer_tokens.append(x.shape[1] - self.protected)

    def attention_bias(self, run: TowerRun, dtype: torch.dtype) -> torch.Tensor | None:
        """(B, 1, 1, N) ``log(size)`` to add to the block's attention logits, or None (nothing merged
        yet, or a pruner without proportional attention): the block then runs exactly as unpatched."""
        if run.size is None or not self.pruner.proportional:
            return None
        return proportional_bias(run.size).to(dtype)

    def merge(self, run: TowerRun, block: int, x: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
        """x (B, N, D) after ``block``'s merges: (B, N - r, D)."""
        r = run.plan[block]
        if r == 0:
            return x
        size = run.size if run.size is not None else x.new_ones(x.shape[:2], dtype=torch.float32)
        attention = run.attention
        while r > 0:  # one matching, or several in a row where the plan merges more than one can
            step = min(r, self.pruner.most_merges(x.shape[1], self.protected))
            matching = self.pruner.match(metric, step, self.protected, block, self.layers, attention=attention)
            if step == 0 or (matching.r < step and self.pruner.exact_plan):
                raise RuntimeError(f"block {block} cannot merge {r} more of its {x.shape[1]} tokens")
            if step < r:
                metric, _ = self._fold(metric, size, matching)  # the next matching compares merged tokens
                attention = _among(attention, matching.kept)
            x, size = self._fold(x, size, matching)
            run.origin = merge_origin(run.origin, matching)
            r = r - matching.r if matching.r == step else 0  # fewer: the plan was a bound the rule decided
        run.size = size
        run.origins[x.shape[1]] = run.origin
        return x

    def _fold(self, x: torch.Tensor, size: torch.Tensor, matching) -> tuple[torch.Tensor, torch.Tensor]:
        """x after ``matching``: size-weighted means (ToMe), or plain means of the tokens merged in this
        step for pruners without ``size_weighted`` (AIM); and the patches each token stands for."""
        if self.pruner.size_weighted:
            return merge_weighted(x, size, matching)
        x, _ = merge_weighted(x, torch.ones_like(size), matching)
        return x, merge_weighted(size[..., None], size, matching)[1]

    def restore(self, run: TowerRun, x: torch.Tensor) -> torch.Tensor:
        """A tensor of per-token rows as some block left them, (B, N', ...), on the original token grid
        (B, N, ...): each patch carries the row of the token it was merged into (``ops.unmerge``). The
        block is found by N' (each merging block leaves fewer tokens); full-size tensors come back as
        they are."""
        origin = run.origins.get(x.shape[1])
        return x if origin is None else unmerge(x, origin, self.protected)

    def token_ids(self, run: TowerRun) -> torch.Tensor:
        """(B, N) fp32: for each original token (prefix tokens included), the id of the token it left
        the tower in, distinct across the batch: patches with the same id were merged into one token;
        -1 for patches dropped inside the tower."""
        batch, patches = run.origin.shape
        n = self.protected + patches
        if batch * n >= _EXACT_IDS:
            raise ValueError(f"{batch} tower inputs of {n} tokens are too many to follow their merged tokens")
        prefix = torch.arange(self.protected, device=run.origin.device).expand(batch, self.protected)
        offsets = torch.arange(batch, device=run.origin.device)[:, None] * n
        origin = torch.cat([prefix, run.origin], dim=1)
        return torch.where(origin >= 0, origin + offsets, -1).float()

    def stats(self, run: TowerRun) -> PruneStats:
        """kept[b]: the patches (0-based among the patch tokens) still alone; merged[b]: per merged token,
        in order, the patches behind it; layer_tokens[b]: patch tokens entering each block."""
        kept, merged = [], []
        for origin in run.origin.cpu():
            present = (origin >= 0).nonzero().flatten()  # the patches not dropped
            tokens = origin[present] - self.protected
            counts = torch.bincount(tokens).tolist()
            groups = present[torch.argsort(tokens, stable=True)].split(counts)  # per token, its patches ascending
            kept.append(torch.stack([g[0] for g in groups if len(g) == 1]) if 1 in counts else tokens[:0])
            merged.append([g for g in groups if len(g) > 1])
        return PruneStats(kept=kept, layer_tokens=[list(run.layer_tokens) for _ in kept], merged=merged)


def _among(attention: torch.Tensor | None, kept: torch.Tensor) -> torch.Tensor | None:
    """The attention (B, H, N, N) among the ``kept`` (B, M) tokens only, rows renormalised."""
    if attention is None:
        return None
    heads = attention.shape[1]
    rows = kept[:, None, :, None].expand(-1, heads, -1, attention.shape[-1])
    sub = attention.gather(2, rows).gather(3, kept[:, None, None, :].expand(-1, heads, kept.shape[1], -1))
    return sub / sub.sum(-1, keepdim=True)
