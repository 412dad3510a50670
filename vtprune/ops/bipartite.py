"""ToMe's bipartite soft matching, size-weighted merging and proportional attention, in batches.

The tower stage (issue 32) merges tokens between encoder blocks. One merge step:

1. ``bipartite_matching(metric, r, protected)`` splits the tokens by the parity of their position (even
   positions are set A, odd ones set B, as ToMe does), links every A token to its most similar B token
   (cosine of ``metric``, e.g. the keys averaged over heads), and picks the ``r`` A tokens with the most
   similar partners to merge away. The first ``protected`` tokens (CLS, registers) neither merge away
   nor absorb others.
2. ``merge_weighted(x, size, matching)``: each merged-away token is folded into its partner as a
   size-weighted mean (sizes: how many original patches a token stands for), sizes add up.
3. ``proportional_bias(size)``: ``log(size)`` added to the attention logits of later blocks, so a
   token standing for s patches is attended to as if it were s copies.

The merged sequence is in ToMe's order (protected tokens, then the unmerged A tokens, then the B
tokens), so the next block's matching pairs the same tokens as ToMe's; ``merge_origin`` keeps track of
which patches each token stands for, from which a VLM's tower stage can restore the spatial order
its language model reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Matching:
    """One merge step over B sequences of N tokens, r of which merge away.

    kept: (B, N - r) positions of the tokens that remain, in the order the merged sequence holds them
    (ToMe's: protected tokens, unmerged A tokens, B tokens); merged: (B, r) positions of the tokens
    merged away; into: (B, r) positions of the tokens each of them merges into (all in ``kept``), or
    -1 for a token dropped outright (pruning, as Zero-TPrune's).
    """

    kept: torch.Tensor
    merged: torch.Tensor
    into: torch.Tensor

    @property
    def r(self) -> int:
        return self.merged.shape[1]


def max_merges(n: int, protected: int = 0) -> int:
    """The most tokens one matching can merge away from ``n`` (half the unprotected tokens, as ToMe)."""
    set_a_protected = (protected + 1) // 2  # protected tokens at even positions are in set A
    return max(0, min((n - protected) // 2, (n + 1) // 2 - set_a_protected))


def max_merges_in(n: int, protected: int = 0, rounds: int = 1) -> int:
    """The most tokens ``rounds`` matchings in a row can merge away from ``n`` (``max_merges`` each)."""
    total = 0
    for _ in range(rounds):
        step = max_merges(n - total, protected)
        total += step
    return total


def spread_merges(n: int, keep: int, steps: int, protected: int = 0, rounds: int = 1) -> list[int]:
    """Tokens to merge away at each of ``steps`` merge steps so that ``keep`` of ``n`` unprotected
    tokens remain after the last (``protected`` more ride along): as even as the steps allow, earlier
    steps taking the remainder. A step runs at most ``rounds`` matchings, each merging at most half
    the unprotected tokens present (``max_merges_in``), so where the later steps could not finish,
    earlier ones take more.

    A ValueError when ``keep`` is not in [1, n], ``steps`` < 1, or no schedule of ``steps`` reaches
    ``keep``.
    """
    for name, value, low in (("n", n, 1), ("steps", steps, 1), ("protected", protected, 0), ("rounds", rounds, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int in [1, {n}], got {keep!r}")

    def fewest_after(present: int, steps_left: int) -> int:
        for _ in range(steps_left):
            present -= max_merges_in(present + protected, protected, rounds)
        return present

    plan, present = [], n
    for step in range(steps):
        most = min(present - keep, max_merges_in(present + protected, protected, rounds))
        r = min(-(-(present - keep) // (steps - step)), most)  # ceil: earlier steps take the remainder
        while r < most and fewest_after(present - r, steps - step - 1) > keep:
            r += 1  # the steps after this one could not finish: take more here
        plan.append(r)
        present -= r
    if present != keep:
        raise ValueError(
            f"{steps} merge steps cannot bring {n} tokens down to {keep} (each step merges at most half of them"
            f"{'' if rounds == 1 else f' {rounds} times'}; the closest is {present}): use more steps or a larger keep"
        )
    return plan


def bipartite_matching(metric: torch.Tensor, r: int, protected: int = 0) -> Matching:
    """ToMe's matching of ``metric`` (B, N, C) (any float dtype; compared in fp32): see the module
    docstring. ``r`` is capped at ``max_merges(N, protected)``; ties keep the earlier position."""
    if metric.dim() != 3 or not metric.is_floating_point():
        raise ValueError(f"metric must be a float tensor of shape (B, N, C), got {tuple(metric.shape)}")
    if isinstance(r, bool) or not isinstance(r, int) or r < 0:
        raise ValueError(f"r must be an int >= 0, got {r!r}")
    batch, n, _ = metric.shape
    if isinstance(protected, bool) or not isinstance(protected, int) or not 0 <= protected <= n:
        raise ValueError(f"protected must be an int in [0, {n}], got {protected!r}")
    r = min(r, max_merges(n, protected))
    positions = torch.arange(n, device=metric.device)
    if r == 0:
        empty = positions.new_zeros(batch, 0)
        return Matching(positions.expand(batch, n), empty, empty)
    unit = torch.nn.functional.normalize(metric.float(), dim=-1)
    a, b = unit[:, ::2], unit[:, 1::2]
    scores = a @ b.transpose(1, 2)  # (B, |A|, |B|)
    scores[:, : (protected + 1) // 2, :] = -torch.inf  # protected A tokens never merge away
    scores[:, :, : protected // 2] = -torch.inf  # nothing merges into protected B tokens
    best, partner = scores.max(dim=-1)  # ties: the first (earlier) B token
    order = best.argsort(dim=-1, descending=True, stable=True)
    merged_a = order[:, :r]
    merged = 2 * merged_a
    into = 2 * partner.gather(1, merged_a) + 1
    # ToMe's order: the protected tokens, the unmerged A tokens (by position when tokens are protected,
    # else most similar first), then the B tokens.
    unmerged_a = 2 * order[:, r:]
    if protected:  # the protected A tokens are the smallest positions: sorted first, then split off
        unmerged_a = unmerged_a.sort(dim=-1).values[:, (protected + 1) // 2 :]
    prefix = positions[:protected].expand(batch, -1)
    b_side = positions[1::2][protected // 2 :].expand(batch, -1)
    kept = torch.cat([prefix, unmerged_a, b_side], dim=1)
    return Matching(kept, merged, into)


def merge_weighted(x: torch.Tensor, size: torch.Tensor, matching: Matching) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the merged-away tokens of ``x`` (B, N, D) into their partners as size-weighted means.

    size: (B, N) patches per token (ones before the first merge). Returns x (B, N - r, D) in x's dtype
    and size (B, N - r); the weighted sums are taken in fp32.
    """
    if x.dim() != 3 or size.shape != x.shape[:2]:
        raise ValueError(f"x must be (B, N, D) and size (B, N), got {tuple(x.shape)} and {tuple(size.shape)}")
    if matching.r == 0:
        return x, size
    weight = size.float()
    total = x.float() * weight[..., None]
    joins = (matching.into >= 0).float()  # dropped tokens (into -1) add nothing
    into = matching.into.clamp(min=0)
    index = into[..., None].expand(-1, -1, x.shape[-1])
    moved = total.gather(1, matching.merged[..., None].expand_as(index)) * joins[..., None]
    total = total.scatter_add(1, index, moved)
    weight = weight.scatter_add(1, into, weight.gather(1, matching.merged) * joins)
    kept = matching.kept
    kept_total = total.gather(1, kept[..., None].expand(-1, -1, x.shape[-1]))
    kept_weight = weight.gather(1, kept)
    return (kept_total / kept_weight[..., None]).to(x.dtype), kept_weight.to(size.dtype)


def merge_origin(origin: torch.Tensor, matching: Matching) -> torch.Tensor:
    """Which token each original patch belongs to, after ``matching``.

    origin: (B, P) long, for each of the tower's P original tokens its token index before the step (-1:
    dropped). Returns (B, P) indices among the N - r tokens after it, -1 for the patches dropped so far.
    """
    batch, n = origin.shape[0], matching.kept.shape[1] + matching.r
    gone = n  # one more slot, for dropped tokens
    target = torch.arange(n + 1, device=origin.device).expand(batch, n + 1).clone()
    target.scatter_(1, matching.merged, matching.into.where(matching.into >= 0, gone))  # a merged token is its partner
    rank = torch.full((batch, n + 1), -1, dtype=torch.long, device=origin.device)
    rank.scatter_(1, matching.kept, torch.arange(matching.kept.shape[1], device=origin.device).expand_as(matching.kept))
    return rank.gather(1, target).gather(1, origin.where(origin >= 0, gone))


def unmerge(x: torch.Tensor, origin: torch.Tensor, protected: int = 0) -> torch.Tensor:
    """Merged tokens back on the original token grid: (B, N', ...) -> (B, protected + P, ...), where
    each of the P patches carries the token it was merged into (``origin`` (B, P), as ``merge_origin``
    keeps it) and the ``protected`` prefix tokens stay first. Copies, so the patches of one merged
    token hold identical values; dropped patches (origin -1) hold zeros."""
    origin = origin.to(x.device)
    shape = (*origin.shape, *([1] * (x.dim() - 2)))
    index = origin.clamp(min=0).reshape(shape).expand(*origin.shape, *x.shape[2:])
    rows = x.gather(1, index)
    if bool((origin < 0).any()):
        rows = rows * (origin >= 0).reshape(shape).to(rows.dtype)
    return torch.cat([x[:, :protected], rows], dim=1)


def proportional_bias(size: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, N) ``log(size)``, added to attention logits of shape (B, heads, queries, N)."""
    return size.float().log()[:, None, None, :]
