"""Vision towers: where their encoder layers are and how to recompute their CLS attention row.

Knowledge of specific vision-encoder classes lives here and nowhere else. Towers without a CLS token
(SigLIP) get a substitute score instead of the CLS row: the attention each token receives, averaged
over heads and over all query tokens.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from vtprune.ops import attention_rows


@dataclass(frozen=True)
class TowerSpec:
    """How to reach the pre-attention norm and the q/k projections of one tower family's layers
    (``query``/``key`` None: one fused ``qkv`` projection, as in Qwen2-VL's towers)."""

    layers: Callable[[nn.Module], nn.ModuleList]
    norm: str  # attribute of an encoder layer: the norm applied before self-attention
    attention: str  # attribute of an encoder layer: the self-attention module
    query: str | None
    key: str | None
    has_cls: bool


def _clip_style_layers(tower: nn.Module) -> nn.ModuleList:
    # transformers 5 flattened CLIPVisionModel; earlier releases nest it under `vision_model`.
    body = getattr(tower, "vision_model", tower)
    return body.encoder.layers


_SPECS = {
    "CLIPVisionModel": TowerSpec(_clip_style_layers, "layer_norm1", "self_attn", "q_proj", "k_proj", True),
    "Dinov2Model": TowerSpec(lambda t: t.encoder.layer, "norm1", "attention", "q_proj", "k_proj", True),
    "SiglipVisionModel": TowerSpec(_clip_style_layers, "layer_norm1", "self_attn", "q_proj", "k_proj", False),
    # Qwen2-VL / Qwen2.5-VL: every image's patches in one sequence, attention within segments
    # (cu_seqlens), 2-D rotary embeddings; no CLS token.
    "Qwen2VisionTransformerPretrainedModel": TowerSpec(lambda t: t.blocks, "norm1", "attn", None, None, False),
    "Qwen2_5_VisionTransformerPretrainedModel": TowerSpec(lambda t: t.blocks, "norm1", "attn", None, None, False),
}


def tower_spec(tower: nn.Module) -> TowerSpec | None:
    return _SPECS.get(type(tower).__name__)


def num_tower_layers(tower: nn.Module) -> int:
    config = tower.config
    return config.num_hidden_layers if hasattr(config, "num_hidden_layers") else config.depth


def has_cls_token(tower: nn.Module) -> bool:
    spec = tower_spec(tower)
    return spec is not None and spec.has_cls


def _attention_input(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor) -> tuple:
    """An encoder layer's self-attention module, its normed input and its softmax scale."""
    attn = getattr(layer, spec.attention)
    scale = getattr(attn, "scale", None) or getattr(attn, "scaling", None)
    return attn, getattr(layer, spec.norm)(hidden), scale


def _heads(projection: nn.Module, x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, T, D) -> (B, H, T, head_dim) through one of the q/k projections."""
    b, t, _ = x.shape
    return projection(x).view(b, t, -1, head_dim).transpose(1, 2)


def _cls_row(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """(B, T) head-mean attention of token 0 (CLS) over all T tokens of an encoder layer's input."""
    attn, x, scale = _attention_input(layer, spec, hidden)
    q = _heads(getattr(attn, spec.query), x[:, :1], attn.head_dim)
    k = _heads(getattr(attn, spec.key), x, attn.head_dim)
    return attention_rows(q, k, scale=scale)[:, 0]


_QUERY_CHUNK = 512  # query rows per step when averaging a whole attention map


def _received_by(q: torch.Tensor, k: torch.Tensor, scale) -> torch.Tensor:
    """(B, T) head- and query-mean attention probabilities each key receives; q, k: (B, H, T, D)."""
    total = sum(
        attention_rows(q[:, :, i : i + _QUERY_CHUNK], k, scale=scale).sum(1) for i in range(0, q.shape[2], _QUERY_CHUNK)
    )
    return total / q.shape[2]


def _received(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Attention each token receives in an encoder layer, averaged over heads and queries: (B, T),
    or (S,) for a fused-qkv tower whose one sequence holds every image (each its own segment)."""
    attn, x, scale = _attention_input(layer, spec, hidden)
    if spec.query is None:
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        bounds = kwargs["cu_seqlens"].tolist()
        return torch.cat(
            [
                _received_by(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None], scale)[0]
                for a, b in zip(bounds[:-1], bounds[1:])
            ]
        )
    q = _heads(getattr(attn, spec.query), x, attn.head_dim)
    k = _heads(getattr(attn, spec.key), x, attn.head_dim)
    # One tower input at a time: each needs its whole (T, T) map.
    return torch.cat([_received_by(q[i : i + 1], k[i : i + 1], scale) for i in range(x.shape[0])])


def _keys(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Head-mean keys of an encoder layer: (B, T, head_dim), or (S, head_dim) for a fused-qkv tower
    (before its rotary embedding: the keys' content, not their place)."""
    attn, x, _ = _attention_input(layer, spec, hidden)
    if spec.query is None:
        n = x.shape[0]
        return attn.qkv(x).reshape(n, 3, attn.num_heads, -1)[:, 1].mean(1).float()
    return _heads(getattr(attn, spec.key), x, attn.head_dim).mean(1).float()


@contextmanager
def capture_keys(tower: nn.Module, layers: list[int]):
    """Record, while active, the head-mean keys of the given encoder layers on every tower call.

    Yields a list that receives one (B, T, head_dim) fp32 tensor per layer call ((S, head_dim) for
    Qwen2-VL towers). Hooks are removed on exit, even when the tower raises.
    """
    with _capture(tower, layers, _keys) as keys:
        yield keys


@contextmanager
def capture_cls_attention(tower: nn.Module, layers: list[int]):
    """Record, while active, the CLS attention row of the given encoder layers on every tower call
    (on towers without a CLS token, the mean attention each token receives).

    Yields a list that receives one (B, T) fp32 tensor per layer call ((S,) for Qwen2-VL towers),
    summed over ``layers`` per tower call by the caller. Hooks are removed on exit, even when the
    tower raises.
    """
    with _capture(tower, layers, _cls_row if tower_spec(tower).has_cls else _received) as rows:
        yield rows


@contextmanager
def _capture(tower: nn.Module, layers: list[int], compute: Callable):
    spec = tower_spec(tower)
    modules = spec.layers(tower)
    out: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            out.append(compute(module, spec, hidden, kwargs))

    handles = [modules[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
