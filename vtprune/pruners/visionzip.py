"""VisionZip (Yang et al., CVPR 2025): dominant tokens by CLS attention, the rest merged into a few
contextual tokens by key similarity."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch

from vtprune.ops.merging import nearest_targets, strided_targets
from vtprune.pruners.base import ModelInfo, Reduction, VisionPruner, VisionTokens, top_k_sorted
from vtprune.pruners.cls import warn_without_cls
from vtprune.registry import register


@register
@dataclass
class VisionZip(VisionPruner):
    """Keeps the tokens the tower's CLS token attends to most (dominant) and merges all the others
    into ``contextual`` tokens.

    Of an image's budget ``keep``, ``round(contextual * keep)`` tokens are contextual (10 of 64 by
    default, the reference's 54 + 10), the rest dominant. Dominant tokens: top CLS attention (head
    mean; towers without CLS: the ``cls`` pruner's substitute) of the layer that produces the selected
    feature. Contextual tokens: among the remaining tokens in order, every ``remaining // contextual``-th
    is a target; every other remaining token joins the target whose key (head mean, same layer) is most
    cosine-similar; each contextual token is the mean of its group's features.

    Differences from the reference code, which compresses CLIP's hidden states before the projector:
    here the projected features are merged (a contextual token is the mean of its group, target
    included; the reference adds the target to the mean of the others), and LLaVA-hf's features hold
    no CLS token, so all dominant tokens are patches (the reference keeps CLS and 53 patches).
    """

    contextual: float = 10 / 64

    name = "visionzip"
    merges = True

    def __post_init__(self) -> None:
        super().__post_init__()
        c = self.contextual
        if isinstance(c, bool) or not isinstance(c, numbers.Real) or not 0 <= c < 1:
            raise ValueError(f"contextual must be a float in [0, 1) (the share of keep that is merged), got {c!r}")

    def check(self, info: ModelInfo) -> None:
        warn_without_cls(info, self.name)

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        return list(info.feature_layers)

    def tower_key_layers(self, info: ModelInfo) -> list[int]:
        return list(info.feature_layers)

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        """The dominant tokens only (the contextual ones are new tokens: see ``reduce``)."""
        return self.reduce(tokens).kept

    def reduce(self, tokens: VisionTokens) -> Reduction:
        n, keep = tokens.features.shape[0], tokens.keep
        device = tokens.features.device
        if keep >= n:
            return Reduction(torch.arange(n, device=device))
        n_contextual = round(self.contextual * keep)
        dominant = top_k_sorted(tokens.cls_attention, keep - n_contextual).to(device)
        if n_contextual == 0:
            return Reduction(dominant)
        rest = torch.ones(n, dtype=torch.bool, device=device)
        rest[dominant] = False
        rest = rest.nonzero().flatten()
        is_target = torch.zeros(rest.numel(), dtype=torch.bool, device=device)
        is_target[strided_targets(rest.numel(), n_contextual).to(device)] = True
        targets, others = rest[is_target], rest[~is_target]
        nearest = nearest_targets(tokens.keys.to(device), targets, others)
        groups = tuple(torch.cat([targets[j : j + 1], others[nearest == j]]) for j in range(targets.numel()))
        return Reduction(dominant, groups)
