"""Pruning the images one vLLM model encodes: the vision stage's own rule, per image, with the
tower signals read while vLLM's tower runs. The model-family files call it around their encoder."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from vtprune.core.image_parts import ImageParts
from vtprune.core.tokens import ModelInfo
from vtprune.core.tower_signals import TowerSignals
from vtprune.core.vision_stage import Visual, kept_features, reduce_visual, token_places
from vtprune.patches.tower_spec import TowerSpec
from vtprune.patches.towers import TowerReader
from vtprune.pruners.base import VisionPruner


def placeholder_count(pruner: VisionPruner, prunable: int, fixed: int = 0) -> int:
    """Placeholder tokens of an image with ``prunable`` tokens the pruner chooses among and ``fixed``
    ones it keeps (the tokens it keeps and merges: a vision-stage pruner's budget counts both)."""
    return fixed + pruner.keep_count(prunable)


class ImagePruning:
    """A vision-stage pruner applied to every image a vLLM model encodes.

    The tower hooks (when the pruner reads the tower) stay for the model's lifetime: vLLM builds the
    model for pruning and never runs it unpruned.
    """

    def __init__(self, pruner: VisionPruner, tower: torch.nn.Module, spec: TowerSpec | None, info: ModelInfo):
        self.pruner = pruner
        self.info = info
        self.reader = TowerReader(tower, pruner.tower_attention_layers(info), pruner.tower_key_layers(info), None, spec)
        self.hooks = self.reader.install()

    @contextmanager
    def reading(self):
        """Collect the tower signals of the encoder calls inside the block; yields a function giving
        them as ``TowerSignals`` (None when the pruner reads nothing) once the tower has run."""
        with self.reader.reading() as read:
            yield lambda: TowerSignals.of(read["scores"], read["keys"])

    def prune(self, features: list[torch.Tensor], layouts: list[ImageParts]) -> list[torch.Tensor]:
        """Per image, the (k, D) tokens that fill its placeholders: the kept ones, then any merged ones
        (as the transformers path scatters them into a position-shifting prompt)."""
        return [tokens for tokens, _ in self._reduce(features, layouts, merged_at_anchor=False)]

    def prune_in_place(
        self, features: list[torch.Tensor], layouts: list[ImageParts]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per image, the (k, D) tokens that fill its placeholders in the order of the image tokens they
        stand at (a merged token at its anchor's), and those tokens' (k,) indices: for models whose
        kept tokens keep their original positions."""
        return self._reduce(features, layouts, merged_at_anchor=True)

    def _reduce(self, features: list, layouts: list, merged_at_anchor: bool) -> list:
        out = []
        for number, (f, parts) in enumerate(zip(features, layouts)):
            reduction, _ = reduce_visual(self.pruner, f, parts)
            tokens = kept_features(Visual("image", number, f, parts), reduction, merged_at_anchor=merged_at_anchor)
            fixed = parts.n_tokens - parts.prunable.numel()
            expected = placeholder_count(self.pruner, parts.prunable.numel(), fixed)
            if tokens.shape[0] != expected:
                raise RuntimeError(
                    f"the {self.pruner.name!r} pruner left {tokens.shape[0]} tokens of an image whose prompt holds "
                    f"{expected} placeholders (vLLM fixes them from keep before the image is encoded): in vLLM a "
                    f"pruner must keep exactly its budget"
                )
            out.append((tokens, token_places(parts, reduction)))
        return out
