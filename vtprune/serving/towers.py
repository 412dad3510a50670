"""vLLM's own vision towers, as vtprune reads them: where their encoder layers are and how a layer
forms its queries and keys (vLLM's attention is fused and returns no weights, so the CLS row and
the keys are recomputed from the layer's input, as ``patches/towers.py`` does for transformers')."""

from __future__ import annotations

import torch
from torch import nn

from vtprune.patches.tower_spec import TowerSpec


def _fused_qkv(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple:
    """q and k (B, H, T, d) of a CLIP-style layer with one ``qkv_proj`` (vLLM's ``QKVParallelLinear``,
    one tensor-parallel rank's heads), the keys' content (the same: no rotary embedding) and the scale."""
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(layer.layer_norm1(hidden))
    q, k, _ = qkv.chunk(3, dim=-1)
    b, t, _ = hidden.shape
    q = q.reshape(b, t, -1, attn.head_dim).transpose(1, 2)
    k = k.reshape(b, t, -1, attn.head_dim).transpose(1, 2)
    return q, k, k, attn.scale


_SPECS = {
    "CLIPVisionModel": TowerSpec(
        lambda tower: tower.vision_model.encoder.layers, "layer_norm1", "self_attn", None, None, True, qk=_fused_qkv
    ),
}


def vllm_tower_spec(tower: nn.Module) -> TowerSpec | None:
    """The spec of one of vLLM's tower classes (by name: vLLM's CLIP shares transformers' class name,
    so a spec is looked up here, never in ``patches/towers.py``), or None when vtprune cannot read it."""
    if not type(tower).__module__.startswith("vllm."):
        return None
    return _SPECS.get(type(tower).__name__)


def built_layers(tower: nn.Module) -> int:
    """Encoder layers vLLM built (it stops at the deepest layer whose output the model selects)."""
    spec = vllm_tower_spec(tower)
    return len(spec.layers(tower)) if spec is not None else 0
