"""Greedy facility location with a per-token bonus: CATP's selection before the language model."""

from __future__ import annotations

import torch


def rescaled_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n, m) cosine similarity of the rows of ``a`` (n, D) and ``b`` (m, D), mapped from [-1, 1] to
    [0, 1] by (cos + 1) / 2, in fp32 (zero rows count as orthogonal to everything)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return (a @ b.T + 1.0) / 2.0


def facility_location(x: torch.Tensor, k: int, bonus: torch.Tensor | None = None) -> torch.Tensor:
    """The standard greedy maximisation of ``F(Y) = sum_x max_{y in Y} s(y, x) + sum_{y in Y} bonus[y]``
    over sets of ``k`` rows of ``x`` (N, D), ``s`` the rescaled cosine: each step takes the row of
    largest gain (the coverage it adds over every row, plus its bonus; ties: the lowest index).
    Returns the (k,) picked indices in pick order. Time O(k N^2), memory O(N^2)."""
    n = x.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, {n}], got {k}")
    similarity = rescaled_cosine(x, x)  # (candidate, covered)
    bonus = similarity.new_zeros(n) if bonus is None else bonus.float().to(similarity.device)
    cover = similarity.new_zeros(n)  # max_{y in Y} s(y, x); 0 for the empty set (s >= 0)
    taken = torch.zeros(n, dtype=torch.bool, device=similarity.device)
    picked = []
    for _ in range(k):
        gain = (similarity - cover).clamp_min_(0).sum(dim=1) + bonus
        gain[taken] = -float("inf")
        best = int(gain.argmax())
        picked.append(best)
        taken[best] = True
        cover = torch.maximum(cover, similarity[best])
    return torch.tensor(picked, dtype=torch.long, device=x.device)
