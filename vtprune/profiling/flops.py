"""Theoretical prefill FLOPs of a LLaVA-family language model from the tokens entering each layer.

Per decoder layer with n tokens (hidden size d, query width q = heads x head_dim, key/value width
kv = kv_heads x head_dim, MLP width m, gated MLP with three matrices):

    projections  2 n (d q + 2 d kv + q d)       q, k, v and o
    attention    2 n (n + 1) / 2 q x 2          causal: each token attends to itself and those before
    MLP          2 n (3 d m)

(2 FLOPs per multiply-add.) The vision tower, the projector, norms, rotary embeddings and the LM
head are left out: they do not change with the visual tokens kept in the LLM (the tower runs in
full for every pruner), so they would only add the same constant to every row.
"""

from __future__ import annotations


def _text_config(config):
    return getattr(config, "text_config", None) or config


def layer_flops(config, n: int) -> float:
    """FLOPs of one decoder layer over ``n`` tokens (see the module docstring)."""
    text = _text_config(config)
    d, m = text.hidden_size, text.intermediate_size
    head_dim = getattr(text, "head_dim", None) or d // text.num_attention_heads
    q = text.num_attention_heads * head_dim
    kv = (getattr(text, "num_key_value_heads", None) or text.num_attention_heads) * head_dim
    projections = 2 * n * (d * q + 2 * d * kv + q * d)
    attention = 2 * 2 * (n * (n + 1) / 2) * q
    mlp = 2 * n * 3 * d * m
    return float(projections + attention + mlp)


def prefill_flops(config, text_tokens: list[int], layer_visual_tokens: list[list[int]]) -> float:
    """FLOPs of the language model's prefill for a batch: sample b has ``text_tokens[b]`` non-visual
    tokens and ``layer_visual_tokens[b][l]`` visual tokens entering decoder layer l (``PruneStats.layer_tokens``)."""
    if len(text_tokens) != len(layer_visual_tokens):
        raise ValueError(f"{len(text_tokens)} samples of text tokens but {len(layer_visual_tokens)} of visual tokens")
    return sum(layer_flops(config, t + v) for t, layers in zip(text_tokens, layer_visual_tokens) for v in layers)
