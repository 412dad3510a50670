"""The containers the stages hand to pruners: what a pruner may know of the model, the tokens it
scores in each stage, and what a vision pruner makes of them. Data, and the check of its consistency."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelInfo:
    """What a pruner may know of the model it is applied to (filled in by the model-family adapter)."""

    num_decoder_layers: int
    num_tower_layers: int
    tower_has_cls: bool
    tower_name: str
    feature_layers: tuple[int, ...]  # encoder layers (0-based) whose output feeds the projector
    visual_tokens: int | None = None  # visual tokens of one image, when every image has the same number


@dataclass
class VisionTokens:
    """One image's visual tokens, as the vision stage scores them.

    features: (N, D) tokens after the projector, in the model's dtype.
    keep: how many of them to keep (the pruner's ``keep_count(N)``, or this part's share of an image's
        budget when a model splits one image into parts).
    grid: (rows, cols) of the patch grid when the N tokens are exactly that grid in raster order.
    cls_attention: (N,) fp32 attention from the tower's CLS token, summed over the layers the pruner
        asked for (``tower_attention_layers``); None unless the pruner asked.
    keys: (N, d) fp32 head-mean keys of the tower, averaged over the layers the pruner asked for
        (``tower_key_layers``), following the model's pooling and merging of patches into tokens;
        None unless the pruner asked.
    text: (T, D) the language model's input embeddings of the text paired with the image (the
        prompt's text after it up to the next image, ``vtprune.core.paired_text``, or before it for a
        pruner with ``text_or_before`` when none follows; T may be 0), in the model's dtype; None
        unless the pruner reads text (``reads_text``).
    """

    features: torch.Tensor
    keep: int
    grid: tuple[int, int] | None = None
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    text: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass
class PromptTokens:
    """One image's visual tokens still inside the language model at a drop point, as LLM-stage pruners
    score them. Only the signals the pruner lists in ``signals`` are filled in.

    keep: how many of these tokens the schedule keeps from this drop point on.
    positions: (N,) ascending indices of these tokens among the image's tokens as they entered the LLM.
    entered: how many of the image's tokens entered the LLM.
    grid: (rows, cols) of the image's patch grid when its tokens entering the LLM formed one, else None.
    attention: (N,) fp32 head-mean attention from the last prompt token (signal ``"last"``).
    attention_before: (N,) fp32 the same, one layer earlier (signal ``"last_before"``).
    instruction_attention: (N,) fp32 attention from the instruction tokens (the text after the last
        image), head- and token-mean (signal ``"instruction"``).
    instruction_peak: (N,) fp32 the most attention any one instruction token gives each (head mean;
        signal ``"instruction_peak"``).
    transition: (N,) fp32 transition variation summed over the pruner's transition layers up to this
        drop point (signal ``"transition"``).
    tower_attention: (N,) fp32 CLS attention in the vision tower at the layers the pruner asks for
        (``tower_attention_layers``; towers without CLS: the attention each token receives), following
        the model's pooling and merging of patches (signal ``"tower"``).
    rater_attention: (N,) fp32 attention from the sample's text raters, head and token mean (signal
        ``"raters"``).
    hidden: (N, D) the tokens' hidden states as they enter the drop layer, in the model's dtype (signal
        ``"hidden"``).
    flow: (N,) fp32 AIM's PageRank importance over the scoring layer's attention (signal ``"flow"``).
    """

    keep: int
    positions: torch.Tensor
    grid: tuple[int, int] | None = None
    entered: int | None = None
    attention: torch.Tensor | None = None
    attention_before: torch.Tensor | None = None
    instruction_attention: torch.Tensor | None = None
    instruction_peak: torch.Tensor | None = None
    transition: torch.Tensor | None = None
    tower_attention: torch.Tensor | None = None
    rater_attention: torch.Tensor | None = None
    hidden: torch.Tensor | None = None
    flow: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.positions.numel()


@dataclass
class SampleTokens:
    """All images of one sample at a drop point of a pruner that ranks them together (``joint``).

    images: every image of the sample still in the language model, in prompt order; each one's
        ``keep`` is its count under the schedule (for those not dropping here, all its tokens).
    dropping: per image, whether it drops at this point.
    keep: how many tokens the dropping images keep in all (their ``keep``s summed), shared as the
        pruner decides.
    instruction_hidden: (T, D) the hidden states, as they enter the drop layer, of the sample's
        instruction (the prompt tokens after its last image; padding left out), in the model's dtype;
        filled with signal ``"hidden"``.
    """

    images: list[PromptTokens]
    dropping: list[bool]
    keep: int
    instruction_hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class Reduction:
    """What a vision pruner makes of one image's (or part's) tokens.

    kept: (k,) ascending long indices of the tokens kept as they are.
    groups: per merged token, the (g,) long indices of the tokens it stands for (disjoint, none of them
        kept); the merged token is their features' mean. Its first index is its anchor: on models that
        keep original positions (M-RoPE), the merged token takes that token's place; in the LLM stage
        (recycling), every merged token takes its anchor's place.
    weights: per group, (g,) non-negative weights of its tokens, not all zero (the merged token is their
        weighted mean); empty: plain means.
    """

    kept: torch.Tensor
    groups: tuple[torch.Tensor, ...] = ()
    weights: tuple[torch.Tensor, ...] = ()

    def fits(self, n: int, keep: int) -> bool:
        """Whether this is a reduction of ``n`` tokens to at most ``keep``: ascending kept indices in
        [0, n), groups disjoint from them and from each other (what the stages check of every pruner)."""
        used = torch.cat([self.kept.cpu().long(), *[g.cpu().long() for g in self.groups]])
        ascending = bool((self.kept[1:] > self.kept[:-1]).all())
        in_range = used.numel() == 0 or (int(used.min()) >= 0 and int(used.max()) < n)
        distinct = used.unique().numel() == used.numel()
        return ascending and in_range and distinct and self.kept.numel() + len(self.groups) <= keep

    @property
    def anchors(self) -> torch.Tensor:
        """(m,) the first index of each group: where its merged token sits on position-keeping models."""
        return torch.stack([g[0] for g in self.groups]) if self.groups else self.kept.new_zeros(0)
