"""PiToMe's energy-guided matching (Tran et al., NeurIPS 2024): merge where tokens are redundant.

A token's energy is how much of the sequence it resembles: the mean over all tokens of
``ELU(cos - margin)`` (the cosine of their metric, e.g. the keys averaged over heads). Tokens in
large clusters of similar tokens have high energy and merge first; small, isolated ones (low energy)
are protected. Two ways of pairing, both returning a ``vtprune.ops.Matching`` in the reference
code's token order:

- ``"pitome"``: the ``2r`` highest-energy tokens are mergeable, taken alternately (by energy rank) into
  sets A and B; every A token merges into its most similar B token. Output order: prefix, the protected
  tokens by descending energy, the B tokens by energy rank.
- ``"pitome_bsm"``: ToMe's bipartite matching over the tokens sorted by energy (A: even ranks, B: odd
  ranks); the ``r`` A tokens with the most similar partners merge. Output order: prefix, the unmerged A
  tokens by descending similarity to their partner, the B tokens by energy rank.

Sorting is stable (ties keep the lower energy rank or position), so the result is deterministic.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vtprune.ops.bipartite import Matching

MODES = ("pitome", "pitome_bsm")


def energy_scores(metric: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """metric (B, T, C) -> (energy (B, T), cosine similarities (B, T, T)), both fp32."""
    unit = F.normalize(metric.float(), dim=-1)
    similarity = unit @ unit.transpose(1, 2)
    return F.elu(similarity - margin).mean(-1), similarity


def energy_matching(metric: torch.Tensor, r: int, protected: int, margin: float, mode: str) -> Matching:
    """Which ``r`` of the tokens of ``metric`` (B, N, C) merge into which, the first ``protected``
    (prefix) tokens taking no part; ``2r`` must not exceed the other tokens (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    batch, n, _ = metric.shape
    tokens = n - protected
    if isinstance(r, bool) or not isinstance(r, int) or not 0 <= 2 * r <= tokens:
        raise ValueError(f"r must be an int in [0, {tokens // 2}] for {tokens} tokens, got {r!r}")
    positions = torch.arange(n, device=metric.device)
    prefix = positions[:protected].expand(batch, protected)
    if r == 0:
        empty = positions.new_zeros(batch, 0)
        return Matching(positions.expand(batch, n), empty, empty)
    energy, similarity = energy_scores(metric[:, protected:], margin)
    by_energy = energy.argsort(dim=-1, descending=True, stable=True)  # (B, T) token indices
    if mode == "pitome":
        mergeable, untouched = by_energy[:, : 2 * r], by_energy[:, 2 * r :]
        a, b = mergeable[:, 0::2], mergeable[:, 1::2]
        partner = _rows(similarity, a, b).argmax(-1)  # first maximum: the higher-energy B token
        merged, into, rest = a, b.gather(1, partner), untouched
    else:
        a, b = by_energy[:, 0::2], by_energy[:, 1::2]
        best, partner = _rows(similarity, a, b).max(-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        merged = a.gather(1, order[:, :r])
        into = b.gather(1, partner.gather(1, order[:, :r]))
        rest = a.gather(1, order[:, r:])
    kept = torch.cat([prefix, rest + protected, b + protected], dim=1)
    return Matching(kept, merged + protected, into + protected)


def _rows(similarity: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(B, |rows|, |cols|) entries of similarity (B, T, T) at the given token indices."""
    picked = similarity.gather(1, rows[..., None].expand(-1, -1, similarity.shape[-1]))
    return picked.gather(2, cols[:, None, :].expand(-1, rows.shape[1], -1))
