"""The signals LLM-stage pruners rank visual tokens by: one table, one place to add a signal.

``SIGNALS`` maps a name a pruner lists in ``signals`` to the ``PromptTokens`` field it fills and to
how it is computed. Attention signals are recomputed at the scoring layer's input from the layer's
own queries and keys (``DecoderAccess.query_key``) for the few query rows they need, so SDPA and flash
attention never have to return attention weights; their results are (B, L') fp32 over the layer's
current (possibly compacted) sequence. A signal with ``earlier`` is computed that many layers before the
pruner's scoring layer (CATP compares the attention of two consecutive layers). Signals without a
``compute`` are filled by the stage itself: the transition variation, summed by its sub-layer hooks
over the pruner's ``transition_layers``, the tower's CLS attention, read in the vision tower and
carried with each image's tokens, and the tokens' hidden states at the drop point.

To add a signal: a field on ``PromptTokens``, a ``compute`` here (or, for one the stage fills, its
code in ``llm_stage.py``), and a row in ``SIGNALS``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from vtprune.core.decoder import DecoderAccess
from vtprune.ops import attention_rows, causal_attention_rank


@dataclass
class ScoringInput:
    """What an attention signal reads at its scoring layer.

    hidden: (B, L', D) the layer's input over the current sequence; position_embeddings: (cos, sin)
    for those tokens; key_mask: (B, L') bool padding mask of the current sequence, or None.
    last: original position of the last prompt token (the same in every sample: left padding);
    length: L, the prompt's original length; instruction_starts: per sample, the original position
    after its last image; prompt_mask: (B, L) bool padding mask of the original prompt, or None;
    raters: per sample, the original positions of its text raters (``text_raters``), when asked for.
    """

    decoder: DecoderAccess
    layer: nn.Module
    hidden: torch.Tensor
    position_embeddings: tuple
    key_mask: torch.Tensor | None
    last: int
    length: int
    instruction_starts: list[int]
    prompt_mask: torch.Tensor | None
    raters: list[torch.Tensor] | None = None  # per sample, original positions of its text raters

    def row(self, position: int) -> int:
        """Current index of an original position after the last visual token (those tokens all stay,
        and samples stay right-aligned)."""
        return self.hidden.shape[1] - (self.length - position)

    def instruction_rows(self) -> list[torch.Tensor]:
        """Per sample, the current indices of the prompt tokens after its last image (the instruction),
        or of the last token when there are none."""
        rows = []
        for b, start in enumerate(self.instruction_starts):
            real = range(start, self.last + 1)
            if self.prompt_mask is not None:
                real = [p for p in real if bool(self.prompt_mask[b, p])]
            rows.append(torch.tensor([self.row(p) for p in real] or [self.row(self.last)]))
        return rows


def last_token_attention(s: ScoringInput) -> torch.Tensor:
    """Head-mean attention of the last prompt token over all keys."""
    rows = torch.tensor([s.row(s.last)], device=s.hidden.device)
    with torch.no_grad():
        q, k, scale = s.decoder.query_key(s.layer, s.hidden, s.position_embeddings, rows)
        return attention_rows(q, k, rows, key_mask=s.key_mask, scale=scale)[:, 0]


def _rows_attention(s: ScoringInput, rows: list[torch.Tensor], reduce) -> torch.Tensor:
    """Head-mean attention of each sample's ``rows`` (current indices) over all keys, ``reduce``d over them."""
    hidden = s.hidden
    out = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for b, r in enumerate(rows):
            pe = tuple(t[b : b + 1] if t.shape[0] > 1 else t for t in s.position_embeddings)
            r = r.to(hidden.device)
            q, k, scale = s.decoder.query_key(s.layer, hidden[b : b + 1], pe, r)
            mask = None if s.key_mask is None else s.key_mask[b : b + 1]
            out[b] = reduce(attention_rows(q, k, r, key_mask=mask, scale=scale)[0])
    return out


def instruction_attention(s: ScoringInput) -> torch.Tensor:
    """Head- and query-mean attention of each sample's instruction tokens over all keys."""
    return _rows_attention(s, s.instruction_rows(), lambda rows: rows.mean(dim=0))


def instruction_peak(s: ScoringInput) -> torch.Tensor:
    """Per key, the most attention any one instruction token gives it (head mean)."""
    return _rows_attention(s, s.instruction_rows(), lambda rows: rows.amax(dim=0))


def rater_attention(s: ScoringInput) -> torch.Tensor:
    """Head- and query-mean attention of each sample's text raters over all keys (SparseVLM)."""
    rows = [torch.tensor([s.row(int(p)) for p in r]) for r in s.raters]
    return _rows_attention(s, rows, lambda a: a.mean(dim=0))


# AIM's PageRank over a decoder layer's attention (its reference code's settings).
FLOW_TEMPERATURE = 0.1
FLOW_ITERATIONS = 5


def attention_flow(s: ScoringInput) -> torch.Tensor:
    """AIM's importance of every token of each sample: ``ops.causal_attention_rank`` over the layer's
    attention among the sample's tokens present (padding left out, so a batch scores as each sample
    alone), sharpened by ``FLOW_TEMPERATURE``, every token a query."""
    hidden = s.hidden
    out = torch.zeros(hidden.shape[:2], dtype=torch.float32, device=hidden.device)
    with torch.no_grad():
        for b in range(hidden.shape[0]):
            real = torch.arange(hidden.shape[1], device=hidden.device)
            if s.key_mask is not None:
                real = real[s.key_mask[b].to(hidden.device)]
            pe = tuple((t[b : b + 1] if t.shape[0] > 1 else t)[:, real] for t in s.position_embeddings)
            rows = torch.arange(real.numel(), device=hidden.device)
            q, k, scale = s.decoder.query_key(s.layer, hidden[b : b + 1, real], pe, rows)
            out[b, real] = causal_attention_rank(q, k, scale / FLOW_TEMPERATURE, FLOW_ITERATIONS)[0]
    return out


def text_raters(embeddings: torch.Tensor, visual: torch.Tensor, instruction: torch.Tensor) -> torch.Tensor:
    """SparseVLM's text raters of one sample: the instruction tokens most relevant to its images at
    the decoder's input. embeddings: (L, D) the sample's input embeddings; visual, instruction: their
    positions. Each visual token's dot products with the instruction tokens go through a softmax over
    the instruction (no scaling, as the reference); the raters are the instruction tokens whose mean
    of it over the visual tokens is above the mean (all of them when none is). Returns their positions."""
    v, t = embeddings[visual].float(), embeddings[instruction].float()
    relevance = torch.softmax(v @ t.T, dim=-1).mean(dim=0)
    raters = instruction[relevance > relevance.mean()]
    return raters if raters.numel() else instruction


@dataclass(frozen=True)
class Signal:
    field: str  # the PromptTokens field it fills
    compute: Callable[[ScoringInput], torch.Tensor] | None  # None: accumulated by sub-layer hooks
    meaning: str
    earlier: int = 0  # computed this many layers before the pruner's scoring layer


TRANSITION = "transition"
TOWER = "tower"  # read in the vision tower, carried with each image's tokens into the LLM
HIDDEN = "hidden"  # the hidden states at the drop point
RATERS = "raters"  # chosen once per prefill from the decoder's input embeddings

SIGNALS: dict[str, Signal] = {
    "last": Signal("attention", last_token_attention, "head-mean attention from the last prompt token"),
    "last_before": Signal(
        "attention_before",
        last_token_attention,
        "head-mean attention from the last prompt token, one layer before the scoring layer",
        earlier=1,
    ),
    "instruction": Signal(
        "instruction_attention",
        instruction_attention,
        "head- and token-mean attention from the instruction (the text after the last image)",
    ),
    "instruction_peak": Signal(
        "instruction_peak",
        instruction_peak,
        "head-mean attention from the instruction, the largest any one of its tokens gives (max over them)",
    ),
    RATERS: Signal(
        "rater_attention",
        rater_attention,
        "head- and token-mean attention from the text raters (SparseVLM: the instruction tokens most similar "
        "to the sample's visual tokens at the decoder's input)",
    ),
    "flow": Signal(
        "flow",
        attention_flow,
        "AIM's PageRank importance: the attention flow reaching each token from every token of the sample (5 "
        "steps from a uniform start over the layer's attention sharpened by temperature 0.1, heads' root mean square)",
    ),
    TRANSITION: Signal(
        "transition", None, "transition variation summed over the pruner's transition layers before the drop"
    ),
    HIDDEN: Signal("hidden", None, "the tokens' hidden states as they enter the drop layer (for recycling)"),
    TOWER: Signal(
        "tower_attention",
        None,
        "attention from the vision tower's CLS token at the layers the pruner asks for (tower_attention_layers)",
    ),
}


def check_signals(name: str, signals) -> None:
    """Raise ValueError unless every one of a pruner's ``signals`` is in ``SIGNALS``."""
    if isinstance(signals, str) or not all(isinstance(s, str) for s in signals):
        raise ValueError(f"the {name!r} pruner's signals must be a tuple of signal names, got {signals!r}")
    unknown = [s for s in signals if s not in SIGNALS]
    if unknown:
        valid = "; ".join(f"{n!r}: {s.meaning}" for n, s in SIGNALS.items())
        raise ValueError(f"the {name!r} pruner asks for unknown signals {unknown}; valid signals: {valid}")
