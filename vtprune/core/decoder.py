"""What the LLM stage needs to reach inside a decoder layer: its attention queries and keys, and its sub-layers.

A model family whose decoder is not Llama-shaped supplies its own ``DecoderAccess`` (the adapter's
``decoder_access()``); nothing else in the stage knows how a decoder layer is built.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

# (layer, hidden (B, L, D), position_embeddings, rows (R,)) -> (q (B, Hq, R, d), k (B, Hkv, L, d), scale)
QueryKeyFn = Callable[[nn.Module, torch.Tensor, tuple, torch.Tensor], tuple]
# layer -> (attention, mlp): each called on its own normed input, returning what joins the residual stream
SublayersFn = Callable[[nn.Module], tuple[nn.Module, nn.Module]]


class DecoderAccess(NamedTuple):
    query_key: QueryKeyFn
    sublayers: SublayersFn
