"""Vision towers: where their encoder layers are and how to recompute their CLS attention row.

Knowledge of specific vision-encoder classes lives here and nowhere else (timm models behind
``TimmWrapperModel`` in ``timm_towers.py``). Towers without a CLS token (SigLIP, FastViT) get a
substitute score instead of the CLS row: the attention each token receives, averaged over heads and
over all query tokens.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from vtprune.core.patching import PerThread
from vtprune.core.tower_signals import GlobalTokenRule
from vtprune.ops import attention_rows, global_token_attention, patch_entropy
from vtprune.patches.timm_towers import timm_spec
from vtprune.patches.tower_spec import TowerSpec


def _clip_layer_merging(layer: nn.Module, x: torch.Tensor, mask, kwargs: dict, merge: Callable) -> torch.Tensor:
    """CLIP's and SigLIP's encoder layer, in their order, with ``merge`` after the attention residual."""
    x = merge(x + layer.self_attn(hidden_states=layer.layer_norm1(x), attention_mask=mask, **kwargs)[0])
    return x + layer.mlp(layer.layer_norm2(x))


def _dinov2_layer_merging(layer: nn.Module, x: torch.Tensor, mask, kwargs: dict, merge: Callable) -> torch.Tensor:
    """DINOv2's layer (layer scale, drop path), in its order, with ``merge`` after the attention residual."""
    attended = layer.attention(layer.norm1(x), attention_mask=mask, **kwargs)[0]
    x = merge(layer.drop_path(layer.layer_scale1(attended)) + x)
    return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x)))) + x


def _clip_style_layers(tower: nn.Module) -> nn.ModuleList:
    # transformers 5 flattened CLIPVisionModel; earlier releases nest it under `vision_model`.
    body = getattr(tower, "vision_model", tower)
    return body.encoder.layers


_QWEN_NO_MERGING = (
    "its patch merger concatenates every 2x2 block of neighbouring patches into one language-model token, "
    "so a patch merged with any other patch leaves a block the merger cannot form (and Qwen2.5-VL's "
    "windowed attention groups patches by place); use a vision-stage pruner after the tower instead"
)

_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN, _IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_SPECS = {
    "CLIPVisionModel": TowerSpec(
        _clip_style_layers,
        "layer_norm1",
        "self_attn",
        "q_proj",
        "k_proj",
        True,
        _clip_layer_merging,
        pixel_mean=_CLIP_MEAN,
        pixel_std=_CLIP_STD,
    ),
    "Dinov2Model": TowerSpec(
        lambda t: t.encoder.layer,
        "norm1",
        "attention",
        "q_proj",
        "k_proj",
        True,
        _dinov2_layer_merging,
        grid_from_config=False,
        pixel_mean=_IMAGENET_MEAN,
        pixel_std=_IMAGENET_STD,
    ),
    "SiglipVisionModel": TowerSpec(
        _clip_style_layers,
        "layer_norm1",
        "self_attn",
        "q_proj",
        "k_proj",
        False,
        _clip_layer_merging,
        pixel_mean=(0.5, 0.5, 0.5),
        pixel_std=(0.5, 0.5, 0.5),
    ),
    # Qwen2-VL / Qwen2.5-VL: every image's patches in one sequence, attention within segments
    # (cu_seqlens), 2-D rotary embeddings; no CLS token.
    "Qwen2VisionTransformerPretrainedModel": TowerSpec(
        lambda t: t.blocks, "norm1", "attn", None, None, False, no_merging=_QWEN_NO_MERGING, one_sequence=True
    ),
    "Qwen2_5_VisionTransformerPretrainedModel": TowerSpec(
        lambda t: t.blocks, "norm1", "attn", None, None, False, no_merging=_QWEN_NO_MERGING, one_sequence=True
    ),
}


def tower_spec(tower: nn.Module) -> TowerSpec | None:
    if type(tower).__name__ == "TimmWrapperModel":
        return timm_spec(tower)
    return _SPECS.get(type(tower).__name__)


def tower_name(tower: nn.Module) -> str:
    """The tower's class, with the timm model's for a ``TimmWrapperModel``."""
    inner = getattr(tower, "timm_model", None)
    return type(tower).__name__ + (f" (timm {type(inner).__name__})" if inner is not None else "")


def num_tower_layers(tower: nn.Module) -> int:
    config = tower.config
    if hasattr(config, "num_hidden_layers"):
        return config.num_hidden_layers
    if hasattr(config, "depth"):
        return config.depth
    spec = tower_spec(tower)
    return len(spec.layers(tower)) if spec is not None else 0


def patch_size(tower: nn.Module, spec: TowerSpec) -> int:
    return spec.patch_size(tower) if spec.patch_size is not None else tower.config.patch_size


def prefix_tokens(tower: nn.Module, spec: TowerSpec) -> int:
    return spec.prefix_tokens(tower) if spec.prefix_tokens is not None else int(spec.has_cls)


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
    if spec.qk is not None:
        q, k, _, scale = spec.qk(layer, hidden, kwargs)
        return attention_rows(q[:, :, :1], k, scale=scale)[:, 0]
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


def _per_input(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict):
    """Per tower input, its queries and keys (1, H, T, D) in an encoder layer, and the softmax scale:
    the batch's rows, or the segments of a fused-qkv tower whose one sequence holds every image."""
    if spec.qk is not None:
        q, k, _, scale = spec.qk(layer, hidden, kwargs)
        if spec.one_sequence:
            yield from _segments(q[0], k[0], scale, kwargs["cu_seqlens"])
            return
        for i in range(q.shape[0]):
            yield q[i : i + 1], k[i : i + 1], scale
        return
    attn, x, scale = _attention_input(layer, spec, hidden)
    if spec.query is None:
        n = x.shape[0]
        q, k, _ = attn.qkv(x).reshape(n, 3, attn.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
        cos, sin = kwargs["position_embeddings"]
        q, k = sys.modules[type(attn).__module__].apply_rotary_pos_emb_vision(q, k, cos, sin)
        yield from _segments(q.transpose(0, 1), k.transpose(0, 1), scale, kwargs["cu_seqlens"])
        return
    q = _heads(getattr(attn, spec.query), x, attn.head_dim)
    k = _heads(getattr(attn, spec.key), x, attn.head_dim)
    for i in range(x.shape[0]):  # one tower input at a time: each needs its whole (T, T) map
        yield q[i : i + 1], k[i : i + 1], scale


def _segments(q: torch.Tensor, k: torch.Tensor, scale, cu_seqlens: torch.Tensor):
    """Per segment of a one-sequence tower (``cu_seqlens`` bounds), its (1, H, T, D) queries and keys
    and the scale; q, k: (H, S, D) over the whole sequence."""
    bounds = cu_seqlens.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b > a:
            yield q[:, a:b][None], k[:, a:b][None], scale


def _per_token(spec: TowerSpec, rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-input (1, T) rows as (B, T), or as (S,) for a fused-qkv tower."""
    return torch.cat([r[0] for r in rows]) if _one_sequence(spec) else torch.cat(rows)


def _one_sequence(spec: TowerSpec) -> bool:
    """Whether the tower runs every image as one sequence (Qwen2-VL's towers)."""
    return spec.one_sequence


def _received(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Attention each token receives in an encoder layer, averaged over heads and queries: (B, T),
    or (S,) for a fused-qkv tower whose one sequence holds every image (each its own segment)."""
    return _per_token(spec, [_received_by(q, k, scale) for q, k, scale in _per_input(layer, spec, hidden, kwargs)])


def _global_attention(
    threshold: float, layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict
) -> torch.Tensor:
    """VFlowOpt's context relevance in an encoder layer (``ops.global_token_attention``): (B, T), or (S,)."""
    rows = []
    for q, k, scale in _per_input(layer, spec, hidden, kwargs):
        chunks = [
            attention_rows(q[:, :, i : i + _QUERY_CHUNK], k, scale=scale) for i in range(0, q.shape[2], _QUERY_CHUNK)
        ]
        rows.append(global_token_attention(torch.cat(chunks, dim=1)[0], threshold)[None])
    return _per_token(spec, rows)


def pixel_entropy(spec: TowerSpec, pixel_values: torch.Tensor, patch: int, prefix: int) -> torch.Tensor:
    """(B, prefix + P) per tower input, the softmax over its P patches of their grey-level entropy
    (``ops.patch_entropy``, on the pixels read back with the family's normalisation), 0 for prefix
    tokens; rows and columns past the last whole patch are not part of any patch (as the tower's)."""
    mean = torch.tensor(spec.pixel_mean, device=pixel_values.device).view(1, 3, 1, 1)
    std = torch.tensor(spec.pixel_std, device=pixel_values.device).view(1, 3, 1, 1)
    h, w = pixel_values.shape[-2] // patch * patch, pixel_values.shape[-1] // patch * patch
    rgb = (pixel_values[..., :h, :w].float() * std + mean) * 255
    shares = torch.softmax(patch_entropy(rgb, patch), dim=-1)
    return torch.cat([shares.new_zeros(shares.shape[0], prefix), shares], dim=1)


def _keys(layer: nn.Module, spec: TowerSpec, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Head-mean keys of an encoder layer: (B, T, head_dim), or (S, head_dim) for a fused-qkv tower
    (before its rotary embedding: the keys' content, not their place)."""
    if spec.qk is not None:
        content = spec.qk(layer, hidden, kwargs)[2].mean(1).float()
        return content[0] if spec.one_sequence else content
    attn, x, _ = _attention_input(layer, spec, hidden)
    if spec.query is None:
        n = x.shape[0]
        return attn.qkv(x).reshape(n, 3, attn.num_heads, -1)[:, 1].mean(1).float()
    return _heads(getattr(attn, spec.key), x, attn.head_dim).mean(1).float()


class TowerReader:
    """What a pruner reads inside the vision tower while it encodes: the CLS attention row of
    ``score_layers`` (on towers without a CLS token, the mean attention each token receives; with a
    ``GlobalTokenRule``, the attention of the layer's global tokens, and the patches' entropy read from
    the pixels the tower receives) and the head-mean keys of ``key_layers``.

    The hooks are installed once (``install``) and read for the thread that asks (``reading``): one
    model may encode in several threads at once, and each thread collects only its own tower calls.
    """

    def __init__(
        self,
        tower: nn.Module,
        score_layers: list[int],
        key_layers: list[int],
        rule: GlobalTokenRule | None = None,
        spec: TowerSpec | None = None,
    ):
        self.tower = tower
        self.spec = spec  # None: the spec of the tower's class (``tower_spec``)
        self.score_layers = score_layers
        self.key_layers = key_layers
        self.rule = rule
        self._reading = PerThread()

    def install(self) -> list:
        """Register the hooks; returns their handles."""
        if not self.score_layers and not self.key_layers:
            return []
        spec = self.spec or tower_spec(self.tower)
        modules = spec.layers(self.tower)
        if self.rule is not None:
            score = functools.partial(_global_attention, self.rule.threshold)
        else:
            score = _cls_row if spec.has_cls else _received
        handles = []
        if self.rule is not None and self.rule.entropy_weight:
            hook = functools.partial(self._read_pixels, spec)
            handles.append(self.tower.register_forward_pre_hook(hook, with_kwargs=True))
        for kind, layers, compute in (("scores", self.score_layers, score), ("keys", self.key_layers, _keys)):
            hook = functools.partial(self._read, kind, spec, compute)
            handles += [modules[i].register_forward_pre_hook(hook, with_kwargs=True) for i in layers]
        return handles

    @contextmanager
    def reading(self):
        """Collect, in this thread, one tensor per hooked layer call: ``scores`` (B, T) fp32 and ``keys``
        (B, T, head_dim) fp32 ((S,) and (S, head_dim) for Qwen2-VL towers), layer order per tower call;
        with an entropy term, its weighted (B, T) shares come first among the scores (they add up)."""
        with self._reading.set({"scores": [], "keys": []}) as read:
            yield read

    def _read(self, kind: str, spec: TowerSpec, compute: Callable, module, args, kwargs) -> None:
        read = self._reading.get()
        if read is None:
            return
        hidden = args[0] if args else kwargs["hidden_states"]
        with torch.no_grad():
            read[kind].append(compute(module, spec, hidden, kwargs))

    def _read_pixels(self, spec: TowerSpec, module, args, kwargs) -> None:
        read = self._reading.get()
        if read is None:
            return
        pixels = args[0] if args else kwargs["pixel_values"]
        with torch.no_grad():
            shares = pixel_entropy(spec, pixels, patch_size(module, spec), prefix_tokens(module, spec))
        read["scores"].append(self.rule.entropy_weight * shares)
