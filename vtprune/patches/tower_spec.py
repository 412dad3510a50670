"""How vtprune reaches one vision-tower family's encoder layers (``towers.py`` and ``timm_towers.py``
fill it in for the towers they know)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class TowerSpec:
    """How to reach the pre-attention norm and the q/k projections of one tower family's layers
    (``query``/``key`` None: one fused ``qkv`` projection, as in Qwen2-VL's towers; ``qk`` set: a
    function ``(layer, hidden, kwargs) -> (q, k, content keys, scale)``, each (B, H, T, d), that forms
    them as the layer does, for towers whose layers are not transformers modules: ``timm_towers.py``).

    merging_layer: ``(layer, x, attention_mask, kwargs, merge) -> x``, the layer's own computation with
    ``merge`` applied after its attention residual (the tower stage), or None; ``no_merging`` then
    says why tokens cannot be merged inside this tower.
    """

    layers: Callable[[nn.Module], nn.ModuleList]
    norm: str  # attribute of an encoder layer: the norm applied before self-attention
    attention: str  # attribute of an encoder layer: the self-attention module
    query: str | None
    key: str | None
    has_cls: bool
    merging_layer: Callable | None = None
    no_merging: str = ""
    # Whether config.image_size is the input size; DINOv2's is its position table's (518 px), resized
    # to whatever input comes (the proxy feeds 224 px), so its grid is known only at the forward.
    grid_from_config: bool = True
    # The per-channel mean and std its image processors normalise pixels with, to read the pixels back
    # (VFlowOpt's patch entropy); None where the tower does not take images as (B, 3, H, W) pixels.
    pixel_mean: tuple[float, float, float] | None = None
    pixel_std: tuple[float, float, float] | None = None
    qk: Callable | None = None
    # The tower's patch side in pixels and its tokens before the patches, where its config does not
    # say (``tower.config.patch_size``; the CLS token when ``has_cls``).
    patch_size: Callable[[nn.Module], int] | None = None
    prefix_tokens: Callable[[nn.Module], int] | None = None
    # Every input in one sequence whose segments (the layer's ``cu_seqlens`` kwarg) attend only within
    # themselves, as Qwen2-VL's towers run; ``qk`` then gives (1, H, S, d) over the whole sequence.
    one_sequence: bool = False
