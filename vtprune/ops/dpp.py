"""Conditional DPP selection: CDPruner's rule (Zhang et al., NeurIPS 2025). Tokens are picked by the
greedy MAP inference of a determinantal point process whose kernel is the tokens' cosine similarity
weighted by each token's relevance to the instruction, so a set scores high when its tokens are both
relevant and unlike each other."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def instruction_relevance(features: torch.Tensor, text: torch.Tensor | None, *, negate: bool = True) -> torch.Tensor:
    """(N,) fp32 relevance in [0, 1] of each row of ``features`` (N, D) to the instruction ``text``
    (T, D), in the same embedding space: the mean cosine similarity over the T text rows, negated when
    ``negate`` (as CDPruner's reference code does), then min-max normalised over the N rows.

    Without text (None or T = 0), or when every row is equally relevant, every row gets 1: the rule
    falls back to plain diversity.
    """
    n = features.shape[0]
    ones = torch.ones(n, dtype=torch.float32, device=features.device)
    if text is None or text.shape[0] == 0:
        return ones
    cosine = F.normalize(features.float(), dim=-1) @ F.normalize(text.float().to(features.device), dim=-1).T
    relevance = cosine.mean(dim=1)
    relevance = -relevance if negate else relevance
    low, span = relevance.min(), relevance.max() - relevance.min()
    if not bool(span > 0):
        return ones
    return (relevance - low) / span


def conditional_dpp(features: torch.Tensor, quality: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy MAP inference of the DPP with kernel ``L[i, j] = quality[i] * cos(x_i, x_j) * quality[j]``
    over the rows x of ``features`` (N, D): each step adds the row that most increases log det of L
    restricted to the chosen rows (Chen, Zhang and Zhou, NeurIPS 2018: incremental Cholesky, O(k N)
    per step). Ties go to the lowest index. Once the kernel's rank is used up (no row adds a
    determinant above zero: more picks than the features' dimension, or duplicate rows), the remaining
    picks are the rows of highest quality not yet chosen.

    quality: (N,) non-negative weights. Returns the (k,) picked indices in pick order (fp32 math).
    """
    n = features.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    if quality.shape != (n,):
        raise ValueError(f"quality must have shape ({n},), got {tuple(quality.shape)}")
    unit = F.normalize(features.float(), dim=-1)
    q = quality.float().to(unit.device)
    similarity = unit @ unit.T
    # A token's cosine with itself is exactly 1 (0 for a zero row): rounding must not break ties.
    similarity.diagonal().copy_((unit.abs().sum(dim=-1) > 0).float())
    kernel = q[:, None] * similarity * q[None, :]
    gains = torch.diagonal(kernel).clone()  # each row's residual gain: det grows by this factor
    floor = 1e-6 * float(gains.max()) if n else 0.0
    rows = kernel.new_zeros(k, n)  # Cholesky rows of the chosen set
    taken = torch.zeros(n, dtype=torch.bool, device=unit.device)
    picked: list[int] = []
    for i in range(k):
        j = int(gains.argmax())
        if float(gains[j]) <= floor:
            break
        e = (kernel[j] - rows[:i, j] @ rows[:i]) / gains[j].sqrt()
        rows[i] = e
        gains -= e * e
        gains[j] = -float("inf")
        taken[j] = True
        picked.append(j)
    if len(picked) < k:  # rank used up: fill by quality (stable: ties to the lowest index)
        order = torch.sort(q.masked_fill(taken, -float("inf")), descending=True, stable=True).indices
        picked += order[: k - len(picked)].tolist()
    return torch.tensor(picked, dtype=torch.long, device=features.device)
