"""M-RoPE positions of a pruned prompt in vLLM (Qwen2-VL's 3-D positions: time, height, width), the
way the transformers path gives them: every kept token at its place in the unpruned prompt, and the
text at the unpruned prompt's positions.

vLLM fixes a request's positions when it schedules the prompt, before its images are encoded; which
tokens an image keeps is known only once it is. So the prompt's positions are laid out for the
unpruned images (``prompt_positions``), each image's placeholders provisionally at its grid's origin,
and the encoder appends each kept token's grid place to its embedding (``with_places``), which
``place_tokens`` writes into the positions when the embeddings enter the language model (vLLM's
``recompute_mrope_positions`` hook) and strips off again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PLACE_CHANNELS = 6  # (t, h, w) grid indices, each as (v // 128, v % 128): exact in bfloat16 up to 32767
_SPANS = "_vtprune_spans"  # the attribute of a request's positions tensor that holds its spans


@dataclass(frozen=True)
class Span:
    """One image's (or video's) placeholders in a pruned prompt."""

    offset: int  # index of its first placeholder in the prompt
    length: int  # its placeholders: the tokens the pruner keeps
    origin: int  # the position of its grid's first token in the unpruned prompt
    t_factor: float  # positions per grid frame along time (a video's seconds per frame times tokens per second)


@dataclass(frozen=True)
class Media:
    """One image or video of a request: its placeholders and its full grid, in tokens."""

    offset: int
    length: int
    grid: tuple[int, int, int]  # (t, h, w) after the patch merger
    t_factor: float = 1.0


def prompt_positions(n_tokens: int, media: list[Media]) -> tuple[torch.Tensor, int]:
    """(3, n_tokens) positions of a pruned prompt and vLLM's position delta (first position after the
    prompt minus its length). Text sits where it sits in the unpruned prompt; each medium's
    placeholders sit at its grid's origin until ``place_tokens`` moves them. The spans ride on the
    returned tensor, which vLLM keeps as the request's positions and hands back to ``place_tokens``."""
    positions = torch.empty(3, n_tokens, dtype=torch.long)
    spans, index, position = [], 0, 0
    for m in sorted(media, key=lambda m: m.offset):
        text = m.offset - index
        positions[:, index : m.offset] = torch.arange(position, position + text)
        origin = position + text
        positions[:, m.offset : m.offset + m.length] = origin
        spans.append(Span(m.offset, m.length, origin, m.t_factor))
        t, h, w = m.grid
        position = origin + max(int((t - 1) * m.t_factor), h - 1, w - 1) + 1
        index = m.offset + m.length
    positions[:, index:] = torch.arange(position, position + n_tokens - index)
    setattr(positions, _SPANS, tuple(spans))
    return positions, _delta(positions, n_tokens)


def with_places(tokens: torch.Tensor, places: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
    """(k, D + PLACE_CHANNELS): ``tokens`` (k, D) with the grid indices of the image tokens they stand at
    (``places`` (k,), indices in raster order over ``grid`` (t, h, w)) appended."""
    _, h, w = grid
    p = places.to(tokens.device).long()
    coords = torch.stack([p // (h * w), p // w % h, p % w], dim=1)
    return torch.cat([tokens, (coords // 128).to(tokens.dtype), (coords % 128).to(tokens.dtype)], dim=1)


def place_tokens(
    embeddings: list[torch.Tensor], positions: torch.Tensor, num_computed_tokens: int
) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """vLLM's ``recompute_mrope_positions`` for a pruned prompt: ``embeddings`` are the media tokens
    entering the language model in this step, in prompt order from ``num_computed_tokens`` on (each
    (k, D + PLACE_CHANNELS)); their grid places move their positions (in ``positions``, (3, N), the
    request's) from their grid's origin to the token's own. Returns the embeddings without their
    place channels, the positions and the position delta. Writing a place twice gives the same
    positions, so a re-run prefill (a preempted request) is safe."""
    spans = getattr(positions, _SPANS, None)
    if spans is None:
        raise RuntimeError(
            "vtprune: this request's M-RoPE positions were not laid out by vtprune's get_mrope_input_positions; "
            "the vLLM release does not call the model as vtprune's plugin expects"
        )
    stripped = [e[:, :-PLACE_CHANNELS] for e in embeddings]
    rows = sum(e.shape[0] for e in embeddings)
    if rows:
        where = torch.cat([torch.arange(s.offset, s.offset + s.length) for s in spans])
        origin = torch.cat([torch.full((s.length,), s.origin) for s in spans])
        t_factor = torch.cat([torch.full((s.length,), s.t_factor, dtype=torch.float64) for s in spans])
        pick = (where >= num_computed_tokens).nonzero()[:rows, 0]
        if pick.numel() != rows:
            raise RuntimeError(f"vtprune: {rows} media embeddings for {pick.numel()} placeholders left in the prompt")
        channels = torch.cat([e[:, -PLACE_CHANNELS:] for e in embeddings]).to("cpu", torch.float64).round().long()
        coords = channels[:, :3] * 128 + channels[:, 3:]  # (rows, 3): t, h, w
        coords[:, 0] = (coords[:, 0] * t_factor[pick]).long()
        positions[:, where[pick]] = (origin[pick, None] + coords).T.to(positions.device)
    return stripped, positions, _delta(positions, positions.shape[1])


def _delta(positions: torch.Tensor, n_tokens: int) -> int:
    return int(positions.max()) + 1 - n_tokens if n_tokens else 0
