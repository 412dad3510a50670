"""MustDrop's spatial merge: similar neighbouring patches pooled window by window.

The patch tokens (after ``protected`` prefix tokens) lie on an ``h x w`` grid, row-major. The grid is
cut into non-overlapping ``k x k`` windows (row-major; rows and columns beyond the last whole window
belong to none and are never merged). A window's score is the mean cosine similarity of its ``k²``
tokens over all ordered pairs of distinct tokens; the highest-scoring windows each merge into one
token, their last (bottom-right) token, as MustDrop's reference code does.
"""

from __future__ import annotations

import torch

from vtprune.ops.bipartite import Matching


def window_positions(grid: tuple[int, int], k: int) -> torch.Tensor:
    """(W, k²) the grid positions of each whole ``k x k`` window of an ``h x w`` grid, row-major."""
    h, w = grid
    rows, cols = h // k * k, w // k * k
    positions = torch.arange(h * w).view(h, w)[:rows, :cols]
    return positions.reshape(rows // k, k, cols // k, k).permute(0, 2, 1, 3).reshape(-1, k * k)


def window_scores(tokens: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """(B, W) mean pairwise cosine of each window's tokens, excluding each token with itself.

    tokens: (B, h*w, C) the patch tokens on the grid (any float dtype; compared in fp32).
    """
    windows = tokens[:, window_positions(grid, k).to(tokens.device)]  # (B, W, k², C)
    unit = torch.nn.functional.normalize(windows.float(), dim=-1)
    sims = unit @ unit.transpose(-1, -2)
    n = k * k
    return (sims.sum((-1, -2)) - sims.diagonal(dim1=-2, dim2=-1).sum(-1)) / (n * (n - 1))


def window_matching(
    metric: torch.Tensor,
    r: int,
    protected: int,
    grid: tuple[int, int],
    k: int = 3,
    threshold: float | None = None,
) -> Matching:
    """Which tokens of ``metric`` (B, N, C), N = protected + h*w, merge into which, window by window.

    With ``threshold`` None, ``r`` tokens merge away: the ``r // (k²-1)`` highest-scoring windows
    merge whole, and if ``r`` is not a multiple of ``k²-1`` the next window merges that many of its
    tokens (those most similar to its last token) into its last token. With a ``threshold``, the
    windows scoring at least it merge whole, at most ``r // (k²-1)`` of them, and a batch merges as many
    windows per sequence as its sequence with the fewest such windows (the reference code's batch rule;
    the highest-scoring ones). Ties keep the earlier window. The kept tokens stay in their order.
    """
    if metric.dim() != 3 or not metric.is_floating_point():
        raise ValueError(f"metric must be a float tensor of shape (B, N, C), got {tuple(metric.shape)}")
    batch, n, _ = metric.shape
    h, w = grid
    if n != protected + h * w:
        raise ValueError(f"{n} tokens are not {protected} prefix tokens and a {h}x{w} grid")
    per_window = k * k - 1
    positions = window_positions(grid, k).to(metric.device) + protected  # (W, k²)
    patches = metric[:, protected:]
    scores = window_scores(patches, grid, k)
    order = scores.argsort(dim=-1, descending=True, stable=True)  # (B, W)
    whole, partial = divmod(min(r, positions.shape[0] * per_window), per_window)
    if threshold is not None:
        whole, partial = min(whole, int((scores >= threshold).sum(-1).min())), 0
    windows = positions[order[:, : whole + (partial > 0)]]  # (B, whole (+1), k²)
    merged = windows[:, :whole, :-1].reshape(batch, -1)
    into = windows[:, :whole, -1:].expand(-1, -1, per_window).reshape(batch, -1)
    if partial:
        last = windows[:, whole]  # (B, k²): the partly merged window
        unit = torch.nn.functional.normalize(
            metric.float().gather(1, last[..., None].expand(-1, -1, metric.shape[-1])), dim=-1
        )
        similarity = (unit[:, :-1] @ unit[:, -1:].transpose(1, 2))[..., 0]  # (B, k²-1) to the last token
        chosen = similarity.argsort(dim=-1, descending=True, stable=True)[:, :partial]
        merged = torch.cat([merged, last.gather(1, chosen)], dim=1)
        into = torch.cat([into, last[:, -1:].expand(-1, partial)], dim=1)
    gone = torch.zeros(batch, n, dtype=torch.bool, device=metric.device)
    gone.scatter_(1, merged, True)
    kept = torch.arange(n, device=metric.device).expand(batch, n)[~gone].view(batch, n - merged.shape[1])
    return Matching(kept, merged, into)
