"""Zero-TPrune's importance and similarity pruning (Wang et al., CVPR 2024), in batches.

A block's attention (B, H, N, N), each query row a distribution over the keys, is a weighted graph:
token j is important when important tokens attend to it. ``attention_rank`` runs the Weighted PageRank
``s <- A^T s`` from uniform scores (the prefix tokens, CLS and registers, starting ``sqrt(N)`` times
higher: the paper's emphasis on the informative region) for ``iterations`` steps per head, drops the
heads whose score spread is outside ``variance_band`` (the variance of ``N * s``, 0 for a head that
ranks every token alike, large for one that ranks a single token far above the rest), and combines the remaining
heads by the root mean square.

``causal_attention_rank`` is AIM's variant inside a language model: the graph is a decoder layer's
causal attention over one sequence, sharpened by a temperature, every token starting alike.

``importance_guided_drops`` is the similarity stage: the patch tokens are sorted by importance and split
into the less important half A and the rest B; each A token's largest cosine similarity (of ``metric``,
e.g. the keys averaged over heads) to a B token measures how much of it B already holds, and the
``r`` A tokens with the largest are dropped.
"""

from __future__ import annotations

import math

import torch

from vtprune.ops.attention import attention_rows
from vtprune.ops.bipartite import Matching


def attention_rank(
    attention: torch.Tensor,
    iterations: int,
    protected: int = 0,
    variance_band: tuple[float, float] | None = (0.01, 0.7),
) -> torch.Tensor:
    """(B, N) importance of each token from ``attention`` (B, H, N, N) (rows sum to one; compared in
    fp32). ``variance_band`` None keeps every head; where no head falls in the band, all are kept."""
    if attention.dim() != 4 or attention.shape[-1] != attention.shape[-2]:
        raise ValueError(f"attention must be (B, H, N, N), got {tuple(attention.shape)}")
    if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
        raise ValueError(f"iterations must be an int >= 1, got {iterations!r}")
    a = attention.float()
    n = a.shape[-1]
    s = a.new_ones(a.shape[:-1])  # (B, H, N)
    s[..., :protected] = math.sqrt(n)
    s = s / s.sum(-1, keepdim=True)
    for _ in range(iterations):
        s = (s.unsqueeze(-2) @ a).squeeze(-2)  # s_j <- sum_i s_i A[i, j]
    if variance_band is None:
        heads = torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
    else:
        spread = (n * s).var(-1, unbiased=False)
        heads = (spread >= variance_band[0]) & (spread <= variance_band[1])
        heads = heads | ~heads.any(-1, keepdim=True)  # no head in the band: keep them all
    weight = heads.float()[..., None]
    return ((s.square() * weight).sum(1) / weight.sum(1)).sqrt()


def causal_attention_rank(q: torch.Tensor, k: torch.Tensor, scale: float, iterations: int) -> torch.Tensor:
    """(B, L) ``attention_rank`` of one causal sequence per sample, from its queries ``q`` (B, Hq, L, D)
    and keys ``k`` (B, Hkv, L, D) (grouped-query heads shared as in ``attention_rows``): the graph of
    each head is ``softmax(q k^T * scale)`` under the causal mask (AIM: ``scale`` is the layer's own
    divided by its temperature), all heads kept. One group of query heads at a time, so the (L, L)
    matrices of only that group exist at once."""
    if q.dim() != 4 or k.dim() != 4 or q.shape[2] != k.shape[2] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q must be (B, Hq, L, D) and k (B, Hkv, L, D) with Hq % Hkv == 0, got {q.shape}, {k.shape}")
    batch, heads, length, _ = q.shape
    group = heads // k.shape[1]
    rows = torch.arange(length, device=q.device)
    squares = q.new_zeros(batch, length, dtype=torch.float32)
    for h in range(k.shape[1]):
        attention = attention_rows(q[:, h * group : (h + 1) * group], k[:, h : h + 1], rows, scale=scale, per_head=True)
        squares += attention_rank(attention, iterations, variance_band=None).square() * group
    return (squares / heads).sqrt()


def importance_guided_drops(metric: torch.Tensor, importance: torch.Tensor, r: int, protected: int = 0) -> Matching:
    """Which ``r`` tokens of ``metric`` (B, N, C) to drop (``Matching`` with ``into`` -1): see the module
    docstring. ``importance``: (B, N); the first ``protected`` tokens are never dropped. ``r`` is capped
    at half the patch tokens. Ties keep the lower position first."""
    if metric.dim() != 3 or importance.shape != metric.shape[:2]:
        raise ValueError(
            f"metric must be (B, N, C) and importance (B, N), got {tuple(metric.shape)}, {tuple(importance.shape)}"
        )
    batch, n, _ = metric.shape
    patches = n - protected
    r = max(0, min(r, patches // 2))
    order = importance[:, protected:].float().argsort(dim=-1, stable=True) + protected  # least important first
    a, b = order[:, : patches // 2], order[:, patches // 2 :]
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    gather = lambda idx: unit.gather(1, idx[..., None].expand(-1, -1, unit.shape[-1]))  # noqa: E731
    closest = (gather(a) @ gather(b).transpose(1, 2)).amax(-1)  # (B, |A|)
    chosen = closest.argsort(dim=-1, descending=True, stable=True)[:, :r]
    dropped = a.gather(1, chosen)
    gone = torch.zeros(batch, n, dtype=torch.bool, device=metric.device)
    gone.scatter_(1, dropped, True)
    kept = torch.arange(n, device=metric.device).expand(batch, n)[~gone].view(batch, n - r)
    return Matching(kept, dropped, torch.full_like(dropped, -1))
