"""Per-token signals read from the vision tower while it encodes: what some vision pruners score with.

``scores`` is the CLS attention of the layers a pruner asks for (``tower_attention_layers``; on towers
without a CLS token, the attention each token receives; or a pruner's ``GlobalTokenRule``), ``keys``
the head-mean keys of the layers it asks for (``tower_key_layers``). Both travel as channels of one
tensor, so a model family's adapter can follow the model's own packing, pooling and merging of tokens
once for all of them. When a tower-stage pruner merged tokens, a third channel travels with them: per
patch, the id of the token it was merged into (``TowerStage.token_ids``), so the vision stage can let
each merged token in once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GlobalTokenRule:
    """The tower score a pruner may ask for instead of the CLS row (VFlowOpt): the attention the
    layer's global tokens pay to each token (``ops.global_token_attention`` with ``threshold``), plus
    ``entropy_weight`` times the softmax over each tower input's patches of their grey-level entropy
    (``ops.patch_entropy``; 0: no entropy term)."""

    threshold: float
    entropy_weight: float = 0.0


@dataclass(frozen=True)
class TowerSignals:
    """values: (P, T, C) per tower input P and token T, or (S, C) for towers that run all images as one
    sequence (Qwen2-VL); channel 0 holds the scores when ``has_scores``, the next one the merged-token
    ids when ``has_ids``, the last ``key_dim`` the keys."""

    values: torch.Tensor
    has_scores: bool
    key_dim: int
    has_ids: bool = False

    @classmethod
    def of(
        cls, scores: list[torch.Tensor], keys: list[torch.Tensor], token_ids: torch.Tensor | None = None
    ) -> TowerSignals | None:
        """From the captured per-layer tensors: scores summed over layers, keys averaged; ``token_ids``
        (P, T) when a tower-stage pruner merged tokens."""
        if not scores and not keys and token_ids is None:
            return None
        channels = [torch.stack(scores).sum(0).float()[..., None]] if scores else []
        if token_ids is not None:
            channels.append(token_ids.float()[..., None])
        if keys:
            channels.append(torch.stack(keys).mean(0).float())
        key_dim = channels[-1].shape[-1] if keys else 0
        return cls(torch.cat(channels, dim=-1), bool(scores), key_dim, token_ids is not None)

    def token_ids(self, rows: torch.Tensor, mixed: torch.Tensor | None = None) -> torch.Tensor | None:
        """(n, C) rows -> (n,) long merged-token ids (see ``TowerStage.token_ids``), None when nothing
        was merged. ``mixed`` (n,) bool marks rows a model's packing blended from several merged tokens
        (a resampled grid): each of those is a token of its own, with an id no other row has."""
        if not self.has_ids:
            return None
        ids = rows[..., int(self.has_scores)].double().round().long()
        if mixed is None or not bool(mixed.any()):
            return ids
        fresh = int(ids.max()) + 1 + torch.arange(ids.numel())
        return torch.where(mixed.to(ids.device), fresh, ids)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(n, C) rows of ``values`` (as a family packed them) -> (scores (n,), keys (n, key_dim)), each
        None when not asked for."""
        scores = rows[..., 0].float() if self.has_scores else None
        keys = rows[..., rows.shape[-1] - self.key_dim :].float() if self.key_dim else None
        return scores, keys
