"""What every pruner shares: the token budget, the stages (tower, vision, LLM, decode) and the inputs
each stage scores."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.core.decode_stage import HeldTokens
from vtprune.core.schedule import (
    DropPoint,
    budget_count,
    budget_tokens,
    check_explicit,
    explicit,
    fit_average,
    published,
)
from vtprune.core.tokens import ModelInfo, PromptTokens, Reduction, SampleTokens, VisionTokens
from vtprune.core.tower_signals import GlobalTokenRule
from vtprune.ops.bipartite import Matching, max_merges, max_merges_in, spread_merges

# What the stages hand a pruner, re-exported here: a pruner's file imports everything it needs from base.


def _checked_keep(keep) -> int | float:
    """``keep`` as a plain int or float (NumPy scalars accepted), or a clear error."""
    if isinstance(keep, bool) or not isinstance(keep, numbers.Real):
        raise TypeError(f"keep must be an int (tokens per image) or a float in (0, 1] (a fraction), got {keep!r}")
    if isinstance(keep, numbers.Integral):
        if keep <= 0:
            raise ValueError(f"keep must be >= 1 when an int (visual tokens kept per image), got {keep}")
        return int(keep)
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1] when a float (fraction of visual tokens kept), got {keep}")
    return float(keep)


def keep_from_text(text: str) -> int | float:
    """``keep`` written on a command line: an int, or a float in (0, 1]; a ValueError saying which."""
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"must be an int or a fraction in (0, 1], got {text!r}") from None
    try:
        return _checked_keep(value)
    except TypeError as error:
        raise ValueError(str(error)) from None


__all__ = [
    "DecodePruner",
    "HeldTokens",
    "LLMPruner",
    "ModelInfo",
    "PromptTokens",
    "Pruner",
    "Reduction",
    "SampleTokens",
    "ScheduledPruner",
    "TowerPruner",
    "VisionPruner",
    "VisionTokens",
    "keep_from_text",
    "leaving_at_least",
    "top_k_sorted",
]

BUDGETS = ("per_frame", "per_video")
PAPER = "paper"  # ScheduledPruner(schedule=PAPER): the method's published drop schedule


@dataclass
class Pruner:
    """Base of all pruners. ``keep``: an int is visual tokens kept per image (capped at what the
    image has), a float in (0, 1] is the fraction of them (rounded, at least one).

    budget: what ``keep`` counts in a video. ``"per_frame"``: every frame is pruned like an image,
    with its own ``keep``; ``"per_video"``: the video's tokens are pruned together, ``keep`` counting
    all of them, so a pruner may keep more of one frame than of another. No effect on images.
    """

    keep: int | float = 64
    budget: str = field(default="per_frame", kw_only=True)

    name: ClassVar[str] = ""
    # "tower": inside the vision tower; "vision": before the LLM; "llm": inside a decoder layer; "decode":
    # in the KV cache between decoding steps
    stage: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.keep = _checked_keep(self.keep)
        self._check_budget()

    def _check_budget(self) -> None:
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")

    def keep_count(self, n: int) -> int:
        """Tokens to keep out of ``n``."""
        return budget_count(self.keep, n)

    def check(self, info: ModelInfo) -> None:
        """Raise ValueError if this pruner cannot run on the described model."""

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        """Vision-encoder layers whose CLS attention this pruner scores with (none by default): a
        vision-stage pruner reads it as ``VisionTokens.cls_attention``, an LLM-stage one as signal
        ``"tower"``."""
        return []

    def tower_key_layers(self, info: ModelInfo) -> list[int]:
        """Vision-encoder layers whose keys this pruner compares tokens with (none by default)."""
        return []

    def tower_score_rule(self) -> GlobalTokenRule | None:
        """How the tower attention this pruner reads is scored when not by the CLS row (None: the CLS
        row, or its substitute on towers without CLS)."""
        return None

    def reads_tower(self, info: ModelInfo) -> bool:
        """Whether this pruner scores with anything read inside the vision tower (attention or keys)."""
        return bool(self.tower_attention_layers(info) or self.tower_key_layers(info))

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def score(self, tokens) -> torch.Tensor:
        """(N,) one score per token of ``tokens`` (``VisionTokens`` or ``PromptTokens``), higher is kept
        first. A pruner whose rule is a ranking defines only this; ``select`` keeps the top ``keep``."""
        raise NotImplementedError(f"{type(self).__name__} must define score() or select()")

    def select(self, tokens) -> torch.Tensor:
        """Ascending (k,) long indices into ``tokens`` of the tokens that stay (k <= ``tokens.keep``): by
        default the ``tokens.keep`` highest of ``score(tokens)``, in original order."""
        scores = self.score(tokens)
        if not isinstance(scores, torch.Tensor) or scores.shape != (len(tokens),):
            got = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
            raise TypeError(f"the {self.name!r} pruner's score() must return a ({len(tokens)},) tensor, got {got}")
        return top_k_sorted(scores, tokens.keep)


CROP_BUDGETS = ("proportional", "global")


@dataclass
class VisionPruner(Pruner):
    """Selects visual tokens from the image features, before the language model.

    crop_budget: how an anyres image's budget (LLaVA-NeXT, OneVision) is shared: ``"proportional"``
        gives the base image and the crops shares in proportion to their token counts and scores all
        crops as one grid; ``"global"`` (GlobalCom²) gives the base image its proportional share and
        splits the rest across the crops by the base image's CLS attention over each crop's region,
        scoring each crop on its own. No effect on images without crops.
    """

    crop_budget: str = field(default="proportional", kw_only=True)

    stage: ClassVar[str] = "vision"
    merges: ClassVar[bool] = False  # whether ``reduce`` may return merged tokens
    # Whether each merged token takes its anchor's place (VFlowOpt) rather than following the kept ones
    # (VisionZip); LLM-stage pruners may come after only the former.
    merges_at_anchor: ClassVar[bool] = False
    reads_text: ClassVar[bool] = False  # whether ``reduce`` reads ``VisionTokens.text`` (CATP, CDPruner)
    # Whether an image with no text after it reads the text before it instead of none (an instruction
    # written ahead of its image: CDPruner).
    text_or_before: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_budget not in CROP_BUDGETS:
            raise ValueError(f"crop_budget must be one of {CROP_BUDGETS}, got {self.crop_budget!r}")

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        """Vision-encoder layers whose CLS attention this pruner scores with (none by default; the
        selected feature's layer when ``crop_budget="global"`` needs it)."""
        return list(info.feature_layers) if self.crop_budget == "global" else []

    def reduce(self, tokens: VisionTokens) -> Reduction:
        """The tokens kept and the groups merged (at most ``tokens.keep`` in all). Pruners that only
        select keep ``select``'s tokens; merging pruners override this."""
        return Reduction(self.select(tokens))


@dataclass
class LLMPruner(Pruner):
    """Drops visual tokens inside the language model at one or more drop points (``drop_points``).

    ``signals`` names the scores a drop point needs (the table ``vtprune.core.llm_signals.SIGNALS``,
    checked by ``vtprune.apply``, says which ``PromptTokens`` field each fills); attention signals are
    computed from the queries and keys of decoder layer ``drop layer - score_offset`` (FastV: the layer
    before the drop; PyramidDrop and TransPrune: the drop layer itself, before it runs).
    """

    stage: ClassVar[str] = "llm"
    signals: ClassVar[tuple[str, ...]] = ("last",)
    score_offset: ClassVar[int] = 0
    # Whether ``select`` runs at a drop point that keeps every token (a pruner that decides per image
    # whether to drop at all); otherwise such a drop point keeps them without asking.
    always_selects: ClassVar[bool] = False
    # Whether a sample's images are ranked together at a drop point (``reduce_sample``, CATP), the
    # images dropping there sharing one budget, rather than each image on its own (``reduce``).
    joint: ClassVar[bool] = False

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        """The schedule for one image with ``n_tokens`` visual tokens entering the LLM."""
        raise NotImplementedError

    def sample_drop_points(self, info: ModelInfo, sizes: list[int]) -> list[list[DropPoint]]:
        """The schedules of one sample's images (``sizes``: their tokens entering the LLM, in prompt
        order): by default each image's own ``drop_points``; a pruner may schedule an image by its
        place in the prompt (CATP: the last image is the query, the others its demonstrations)."""
        return [self.drop_points(info, n) for n in sizes]

    def reduce_sample(self, sample: SampleTokens) -> list[Reduction]:
        """For a ``joint`` pruner: per image of ``sample``, what stays (images not dropping keep every
        token; the dropping ones keep at most ``sample.keep`` in all, recycled tokens counted)."""
        raise NotImplementedError(f"{type(self).__name__} is joint and must define reduce_sample()")

    def reduce(self, tokens: PromptTokens) -> Reduction:
        """The tokens that stay at a drop point (at most ``tokens.keep`` in all): kept ones, and
        *recycled* ones, each the (weighted) mean of a group of tokens that leave, standing at its
        anchor's place (the group's first index) with that token's position. Pruners that only select
        keep ``select``'s tokens; recycling pruners override this."""
        return Reduction(self.select(tokens))

    def transition_layers(self, info: ModelInfo, points: list[DropPoint]) -> range:
        """Decoder layers whose sub-layer transition variation accumulates (signal ``"transition"``),
        given this image's drop points; a drop point sees the sum over the window's layers before it."""
        return range(0)


@dataclass
class ScheduledPruner(LLMPruner):
    """An LLM-stage pruner with several drop points. ``keep`` is the mean number of visual tokens per
    decoder layer (an int: tokens per image; a float: a fraction of them), met by scaling the
    method's schedule shape (``fit_average``: the default, so pruners compare at equal cost);
    ``schedule=[(layer, keep), ...]`` sets the drop points and the tokens kept from each instead (keeps
    as in ``keep``, relative to the tokens entering the LLM); ``schedule="paper"`` runs the paper's own
    schedule (``published``: its drop depths as fractions of this decoder, its kept ratios), ``keep``
    unread, to reproduce the paper's setting.
    """

    schedule: list | str | None = None

    depths: ClassVar[tuple[float, ...]] = ()  # drop layers as fractions of the decoder depth
    ratios: ClassVar[tuple[float, ...]] = ()  # tokens kept from each drop point, fractions of all
    # A pruner whose paper sets its budget by other options names them here; it has no schedule="paper".
    paper_options: ClassVar[str] = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.schedule, str):
            if self.schedule != PAPER:
                raise ValueError(
                    f"schedule must be None (fit to keep), {PAPER!r} or [(layer, keep), ...], got {self.schedule!r}"
                )
            if self.paper_options:
                raise ValueError(
                    f"the {self.name!r} pruner has no schedule={PAPER!r}: its paper's settings are {self.paper_options}"
                )
        elif self.schedule is not None:
            check_explicit(self.schedule, None)  # its form now; its layers against the decoder in check()

    def check(self, info: ModelInfo) -> None:
        if info.num_decoder_layers < 2:
            raise ValueError(
                f"the {self.name!r} pruner drops tokens between decoder layers; this decoder has one layer"
            )
        if self.schedule is not None and self.schedule != PAPER:
            check_explicit(self.schedule, info.num_decoder_layers)
            self.schedule = [tuple(point) for point in self.schedule]

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        if self.schedule == PAPER:
            return published(list(self.depths), list(self.ratios), info.num_decoder_layers, n_tokens)
        if self.schedule is not None:
            return explicit(self.schedule, n_tokens)
        average = budget_tokens(self.keep, n_tokens)
        return fit_average(list(self.depths), list(self.ratios), info.num_decoder_layers, n_tokens, average)


@dataclass
class DecodePruner(Pruner):
    """A cache policy: removes visual entries from the KV cache between decoding steps (the decode
    stage, ``vtprune/core/decode_stage.py``), after whatever the other stages kept.

    Before each decode step at which ``evicts_at(step)`` holds (step 0: the first step after the
    prefill), every decoder layer from ``first_layer(info)`` on (never layer 0, whose length is the
    sequence length ``generate()`` counts) shows the policy each image's visual entries it holds
    (``HeldTokens``), and ``hold`` returns the ascending indices of those that stay, per image, per
    layer, per sample. ``keep`` is the policy's own to read (a policy that follows the prefill's choice
    ignores it). Last in a Pipeline.
    """

    stage: ClassVar[str] = "decode"

    def evicts_at(self, step: int) -> bool:
        """Whether the policy chooses before decode step ``step`` (default: once, after the prefill)."""
        return step == 0

    def first_layer(self, info: ModelInfo) -> int:
        """The first decoder layer whose cache the policy may shorten (at least 1)."""
        return 1

    def hold(self, tokens: HeldTokens) -> torch.Tensor:
        """Ascending (k,) long indices into ``tokens`` of the entries that stay in the layer's cache."""
        raise NotImplementedError(f"{type(self).__name__} must define hold()")


@dataclass
class TowerPruner(Pruner):
    """Reduces tokens inside the vision tower, between the attention and the MLP of encoder blocks
    (where ToMe merges): the tower stage. Its blocks after that point, and everything after the tower,
    run on fewer tokens.

    keep: patch tokens per image leaving the last block (an int, or a fraction of the patches; 1.0
        merges nothing). Prefix tokens (CLS, registers) are never merged and not counted.
    layers: the blocks that merge (None: every block). ``keep`` is spread over them as evenly as each
        block's limit allows (one matching merges at most half the tokens a block holds, earlier blocks
        taking the remainder; ``vtprune.ops.spread_merges``). Where the blocks are too few to reach
        ``keep`` that way (small towers, or a VLM selecting an early layer), each block runs as many
        matchings in a row as needed, the fewest that reach it.

    A subclass may also offer its paper's own budget, an option named by ``paper_budget`` (ToMe's
    ``r``) that sets each merging block's merges from the tokens it holds (``paper_merges``) instead of
    ``keep``; a user gives one or the other.

    Video frames the model pools after the tower (LLaVA-NeXT-Video, OneVision): ``keep`` counts the
    frame's tokens as the language model gets them (the pooled grid's, e.g. 144 of 576 patches), and
    the tokens leaving the tower take the pooling's place (``vtprune.core.video_frames``). Every frame
    passes the tower on its own, so ``budget`` can only be ``"per_frame"``.
    """

    keep: int | float | None = None
    layers: tuple[int, ...] | None = field(default=None, kw_only=True)

    stage: ClassVar[str] = "tower"
    default_keep: ClassVar[int] = 64
    paper_budget: ClassVar[str] = ""  # the option name, e.g. "r"; "" for none
    # Where a block merges: "attention" (after the attention residual, comparing the keys averaged over
    # heads, as ToMe) or "block" (after the block's output, comparing its hidden states, as MustDrop).
    merges_after: ClassVar[str] = "attention"
    # What a block merging after its output compares: "hidden" (its hidden states, as MustDrop) or
    # "next_keys" (the keys the next block's attention would compute from them, all heads, as AIM; the
    # hidden states when the block is the tower's last).
    block_metric: ClassVar[str] = "hidden"
    size_weighted: ClassVar[bool] = True  # merged tokens are size-weighted means (ToMe), else plain means
    reads_attention: ClassVar[bool] = False  # the adapter then computes the attention probabilities
    drops: ClassVar[bool] = False  # whether tokens are dropped (Matching.into -1) rather than merged

    def __post_init__(self) -> None:
        if self._paper_budget() is None:
            self.keep = self.default_keep if self.keep is None else self.keep
            super().__post_init__()
        else:
            if self.keep is not None:
                raise ValueError(
                    f"give keep (patch tokens leaving the tower) or {self.paper_budget} (the paper's budget), not both"
                )
            self._check_paper_budget()
            self._check_budget()
        if self.budget != "per_frame":
            raise ValueError(
                f"budget={self.budget!r}: a tower-stage pruner reduces each tower input (an image, a crop, a "
                f"video frame) on its own, so keep counts per frame; only budget='per_frame' is available"
            )
        self._check_layers()
        proportional = getattr(self, "proportional", False)
        if not isinstance(proportional, bool):
            raise ValueError(f"proportional must be True or False, got {proportional!r}")

    def _paper_budget(self):
        return getattr(self, self.paper_budget) if self.paper_budget else None

    def _check_paper_budget(self) -> None:
        """Raise ValueError for a bad value of the ``paper_budget`` option."""

    def paper_merges(self, present: int) -> int:
        """Tokens a merging block removes of the ``present`` patch tokens it holds, by the paper's budget."""
        raise NotImplementedError(f"{type(self).__name__} must define paper_merges()")

    def keep_count(self, n: int) -> int:
        return n if self._paper_budget() is not None else super().keep_count(n)

    def _check_layers(self) -> None:
        if self.layers is None:
            return
        layers = self.layers
        if (
            not isinstance(layers, (list, tuple))
            or not layers
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers)
        ):
            raise ValueError(f"layers must be a non-empty list of block indices >= 0, or None; got {layers!r}")
        if sorted(set(layers)) != list(layers):
            raise ValueError(f"layers must be ascending without repeats, got {list(layers)}")
        self.layers = tuple(layers)

    def merging_blocks(self, blocks: int) -> tuple[int, ...]:
        """The blocks (of ``blocks``) that merge; a ValueError for a block the tower does not have."""
        if self.layers is None:
            return tuple(range(blocks))
        if self.layers[-1] >= blocks:
            raise ValueError(f"layers={list(self.layers)}: the tower has blocks 0 to {blocks - 1}")
        return self.layers

    def leaving(self, patches: int, counted_on: int | None = None) -> int:
        """Patch tokens to leave the tower of ``patches``, ``keep`` counting ``counted_on`` tokens
        (default the patches; a pooled frame's tokens): all of them when ``keep`` keeps all it counts,
        so that ``keep=1.0`` is the identity everywhere."""
        counted_on = patches if counted_on is None else counted_on
        keep = self.keep_count(counted_on)
        return patches if keep >= counted_on else keep

    def merge_plan(self, patches: int, protected: int, blocks: int, counted_on: int | None = None) -> list[int]:
        """Tokens to merge away in each of ``blocks`` blocks, for ``patches`` patch tokens and
        ``protected`` prefix tokens (``keep`` counting ``counted_on`` tokens, see ``leaving``); a
        ValueError when ``keep`` cannot be reached."""
        merging = self.merging_blocks(blocks)
        if self._paper_budget() is not None:
            plan, present = [], patches
            for block in range(blocks):
                r = (
                    min(self.paper_merges(present), max_merges(present + protected, protected))
                    if block in merging
                    else 0
                )
                plan.append(r)  # at most one matching's worth: the papers' own cap
                present -= r
            return plan
        keep = self.leaving(patches, counted_on)
        rounds = 1
        while max_merges_in(patches + protected, protected, rounds * len(merging)) < patches - keep:
            rounds += 1  # too few blocks to get there by halving once each: match again within a block
        r = spread_merges(patches, keep, len(merging), protected, rounds)
        plan = [0] * blocks
        for block, count in zip(merging, r):
            plan[block] = count
        return plan

    def most_merges(self, n: int, protected: int) -> int:
        """The most tokens one ``match`` can merge away of ``n`` (``protected`` of them prefix tokens)."""
        return max_merges(n, protected)

    @property
    def exact_plan(self) -> bool:
        """False where ``merge_plan`` is only a bound and ``match`` decides from the data how many merge."""
        return True

    def match(self, metric: torch.Tensor, r: int, protected: int, layer: int, layers: int, attention=None) -> Matching:
        """Which ``r`` tokens of ``metric`` (B, N, C) merge into which (``vtprune.ops.Matching``), the
        first ``protected`` taking no part, in block ``layer`` of a tower of ``layers`` blocks;
        ``attention`` (B, H, N, N), the block's attention probabilities, for pruners with
        ``reads_attention``."""
        raise NotImplementedError(f"{type(self).__name__} must define match()")


def leaving_at_least(pruner: TowerPruner, at_least: int | float, patches: int, counted_on: int | None) -> int:
    """Patch tokens leaving the tower under ``pruner`` (its own ``leaving``) when it is a pipeline's
    first stage, but never fewer than ``at_least`` (the pipeline's ``keep``) counts: all of them when
    that keeps every token, so that the pipeline's ``keep=1.0`` is the identity."""
    counted_on = patches if counted_on is None else counted_on
    floor = budget_count(at_least, counted_on)
    return patches if floor >= counted_on else max(TowerPruner.leaving(pruner, patches, counted_on), floor)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties: lower index first)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return order.sort().values
