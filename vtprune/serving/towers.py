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


def _qwen_qkv(attn: nn.Module, normed: torch.Tensor, kwargs: dict) -> tuple:
    """q and k (1, H, S, d) over the one sequence of a Qwen2-VL / Qwen2.5-VL tower block's attention in
    vLLM (its fused ``qkv``, one rank's heads; ``normed`` (S, 1, C), the block's normed input), turned
    by the block's 2-D rotary embedding as the attention turns them; the keys' content before it; the
    scale."""
    qkv, _ = attn.qkv(normed)
    heads, d = attn.num_attention_heads_per_partition, attn.hidden_size_per_attention_head
    q, k, _ = qkv.reshape(qkv.shape[0], 3, heads, d).unbind(1)  # (S, H, d) each
    turned = attn.apply_rotary_emb(torch.stack([q, k]), kwargs["rotary_pos_emb_cos"], kwargs["rotary_pos_emb_sin"])
    q_turned, k_turned = turned.unbind(0)
    return (*(x.transpose(0, 1)[None] for x in (q_turned, k_turned, k)), d**-0.5)


# The hooks sit on each block's attention, not on the block: vLLM may wrap Qwen2.5-VL's blocks for
# torch.compile (support_torch_compile), whose __call__ runs forward without the module's hooks.
_QWEN = TowerSpec(
    lambda tower: [block.attn for block in tower.blocks], "", "", None, None, False, qk=_qwen_qkv, one_sequence=True
)


_SPECS = {
    "CLIPVisionModel": TowerSpec(
        lambda tower: tower.vision_model.encoder.layers, "layer_norm1", "self_attn", None, None, True, qk=_fused_qkv
    ),
    "Qwen2VisionTransformer": _QWEN,
    "Qwen2_5_VisionTransformer": _QWEN,
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
