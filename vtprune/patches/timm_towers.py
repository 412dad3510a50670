"""Vision towers that are timm models behind transformers' ``TimmWrapperModel``: where their attention
layers are and how to recompute their queries and keys from a layer's input (``TowerSpec.qk``).

The recomputation reads the same projections the layer applies (a fused ``qkv``, q/k norms, rotary
embedding), so the reader gets the attention timm's fused SDPA never forms, and the layer's own
output is untouched: the hooks only look at its input.

- FastViT-HD (``FastVit``, FastVLM's tower): three convolutional stages, then two attention stages.
  Only the last stage's blocks count as tower layers: their grid (the image downsampled 64 times) is
  the grid of the model's visual tokens; the earlier attention stage runs on a grid twice as fine.
  No CLS token. Tokens cannot merge inside it: convolutions follow every attention (the blocks' MLPs,
  the position encodings, the final 3x3 convolution), each mixing a patch with its grid neighbours.
- Perception Encoder (``Eva`` with RoPE, PerceptionLM's tower): a CLS token, 2-D rotary embeddings on
  the patches' queries and keys. Tokens cannot merge inside it: the model average-pools every
  ``projector_pooling_ratio`` x ``projector_pooling_ratio`` block of the output grid, which needs the
  whole grid, and a merged token has no single rotary position. Grouped-query attention (fewer key
  heads) is left to ``ops.attention_rows``, which takes it.
"""

from __future__ import annotations

import torch
from torch import nn

from vtprune.patches.tower_spec import TowerSpec

_FASTVIT_NO_MERGING = (
    "convolutions follow each of its attention blocks (the blocks' convolutional MLPs, the stages' "
    "position encodings and its final 3x3 convolution), each mixing a patch with its neighbours on the "
    "grid, so a merged or dropped patch leaves a grid they cannot run on; use a vision-stage pruner"
)
_PE_NO_MERGING = (
    "PerceptionLM average-pools blocks of the tower's output grid (projector_pooling_ratio), which needs "
    "the whole grid, and a merged patch has no single rotary position; use a vision-stage pruner"
)


def _fastvit_qk(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple:
    """A FastViT attention block's queries and keys (B, H, N, d) from its (B, C, h, w) input, as its
    token mixer forms them (raster order, no positional term), and its softmax scale."""
    attn = layer.token_mixer
    x = layer.norm(hidden).flatten(2).transpose(1, 2)
    b, n, _ = x.shape
    q, k, _ = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, k, attn.scale


def _eva_qk(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> tuple:
    """An Eva block's queries and keys (B, H, T, d) from its (B, T, C) input, as its attention forms
    them (q/k norms; the rotary embedding on the tokens after the prefix), its keys before the rotary
    embedding (their content, not their place), and its softmax scale."""
    from timm.layers import apply_rot_embed_cat

    attn = layer.attn
    x = layer.norm1(hidden)
    b, t, _ = x.shape
    heads, kv_heads = attn.num_heads, getattr(attn, "num_kv_heads", attn.num_heads)
    if attn.qkv is not None:
        qkv = attn.qkv(x)
        if getattr(attn, "q_bias", None) is not None:  # EvaAttention's separate q/k/v biases
            qkv = qkv + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
        q, k, _ = qkv.reshape(b, t, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        q = attn.q_proj(x).reshape(b, t, heads, -1).transpose(1, 2)
        k = attn.k_proj(x).reshape(b, t, kv_heads, -1).transpose(1, 2)
    q, k = attn.q_norm(q), attn.k_norm(k)
    content = k
    rope = kwargs.get("rope")
    if rope is not None:
        npt, half = attn.num_prefix_tokens, getattr(attn, "rotate_half", False)
        q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
        k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
    return q, k, content, attn.scale


def timm_spec(tower: nn.Module) -> TowerSpec | None:
    """The ``TowerSpec`` of a ``TimmWrapperModel``'s timm model, or None for a timm model vtprune does
    not know."""
    model = tower.timm_model
    kind = type(model).__name__
    if kind == "FastVit" and _fastvit_attention_last(model):
        # No pixel statistics: FastVLM's processor, not timm's configuration, decides its normalisation.
        return TowerSpec(
            lambda t: t.timm_model.stages[-1].blocks,
            "norm",
            "token_mixer",
            None,
            None,
            has_cls=False,
            no_merging=_FASTVIT_NO_MERGING,
            qk=_fastvit_qk,
        )
    if kind == "Eva" and all(hasattr(b, "attn") and hasattr(b, "norm1") for b in model.blocks):
        mean, std = _pixel_statistics(model)
        return TowerSpec(
            lambda t: t.timm_model.blocks,
            "norm1",
            "attn",
            None,
            None,
            has_cls=getattr(model, "cls_token", None) is not None,
            no_merging=_PE_NO_MERGING,
            qk=_eva_qk,
            patch_size=lambda t: t.timm_model.patch_embed.patch_size[0],
            prefix_tokens=lambda t: int(t.timm_model.num_prefix_tokens),
            pixel_mean=mean,
            pixel_std=std,
        )
    return None


def _fastvit_attention_last(model: nn.Module) -> bool:
    """Whether a FastViT's last stage is made of attention blocks (FastViT-HD / MCi3 and MCi4)."""
    return all(hasattr(b, "token_mixer") and hasattr(b.token_mixer, "qkv") for b in model.stages[-1].blocks)


def _pixel_statistics(model: nn.Module) -> tuple:
    """The normalisation a timm model's pretrained configuration names (what the processors of the
    families that use it apply), as (mean, std), or (None, None)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None, None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
