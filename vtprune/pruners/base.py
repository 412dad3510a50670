"""What every pruner shares: the token budget, the two stages and the inputs each stage scores."""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from vtprune.core.schedule import DropPoint, budget_count, budget_tokens, check_explicit, explicit, fit_average


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
    """

    features: torch.Tensor
    keep: int
    grid: tuple[int, int] | None = None
    cls_attention: torch.Tensor | None = None
    keys: torch.Tensor | None = None


@dataclass
class PromptTokens:
    """One image's visual tokens still inside the language model at a drop point, as LLM-stage pruners
    score them. Only the signals the pruner lists in ``signals`` are filled in.

    keep: how many of these tokens the schedule keeps from this drop point on.
    positions: (N,) ascending indices of these tokens among the image's tokens as they entered the LLM.
    grid: (rows, cols) of the image's patch grid when its tokens entering the LLM formed one, else None.
    attention: (N,) fp32 head-mean attention from the last prompt token (signal ``"last"``).
    instruction_attention: (N,) fp32 attention from the instruction tokens (the text after the last
        image), head- and token-mean (signal ``"instruction"``).
    transition: (N,) fp32 transition variation summed over the pruner's transition layers up to this
        drop point (signal ``"transition"``).
    """

    keep: int
    positions: torch.Tensor
    grid: tuple[int, int] | None = None
    attention: torch.Tensor | None = None
    instruction_attention: torch.Tensor | None = None
    transition: torch.Tensor | None = None


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


BUDGETS = ("per_frame", "per_video")


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
    stage: ClassVar[str] = ""  # "vision": before the LLM; "llm": inside a decoder layer

    def __post_init__(self) -> None:
        self.keep = _checked_keep(self.keep)
        if self.budget not in BUDGETS:
            raise ValueError(f"budget must be one of {BUDGETS}, got {self.budget!r}")

    def keep_count(self, n: int) -> int:
        """Tokens to keep out of ``n``."""
        return budget_count(self.keep, n)

    def check(self, info: ModelInfo) -> None:
        """Raise ValueError if this pruner cannot run on the described model."""

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


CROP_BUDGETS = ("proportional", "global")


@dataclass(frozen=True)
class Reduction:
    """What a vision pruner makes of one image's (or part's) tokens.

    kept: (k,) ascending long indices of the tokens kept as they are.
    groups: per merged token, the (g,) long indices of the tokens it stands for (disjoint, none of them
        kept); the merged token is their features' mean. Its first index is its anchor: on models that
        keep original positions (M-RoPE), the merged token takes that token's place.
    """

    kept: torch.Tensor
    groups: tuple[torch.Tensor, ...] = ()

    @property
    def anchors(self) -> torch.Tensor:
        """(m,) the first index of each group: where its merged token sits on position-keeping models."""
        return torch.stack([g[0] for g in self.groups]) if self.groups else self.kept.new_zeros(0)


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_budget not in CROP_BUDGETS:
            raise ValueError(f"crop_budget must be one of {CROP_BUDGETS}, got {self.crop_budget!r}")

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        """Vision-encoder layers whose CLS attention this pruner scores with (none by default; the
        selected feature's layer when ``crop_budget="global"`` needs it)."""
        return list(info.feature_layers) if self.crop_budget == "global" else []

    def tower_key_layers(self, info: ModelInfo) -> list[int]:
        """Vision-encoder layers whose keys this pruner compares tokens with (none by default)."""
        return []

    def reads_tower(self, info: ModelInfo) -> bool:
        """Whether this pruner scores with anything read inside the vision tower (attention or keys)."""
        return bool(self.tower_attention_layers(info) or self.tower_key_layers(info))

    def select(self, tokens: VisionTokens) -> torch.Tensor:
        """Ascending (k,) long indices into ``tokens.features`` of the tokens to keep."""
        raise NotImplementedError

    def reduce(self, tokens: VisionTokens) -> Reduction:
        """The tokens kept and the groups merged (at most ``tokens.keep`` in all). Pruners that only
        select keep ``select``'s tokens; merging pruners override this."""
        return Reduction(self.select(tokens))


SIGNALS = ("last", "instruction", "transition")


@dataclass
class LLMPruner(Pruner):
    """Drops visual tokens inside the language model at one or more drop points (``drop_points``).

    ``signals`` names the scores a drop point needs (see ``PromptTokens``); attention signals are
    computed from the queries and keys of decoder layer ``drop layer - score_offset`` (FastV: the layer
    before the drop; PyramidDrop and TransPrune: the drop layer itself, before it runs).
    """

    stage: ClassVar[str] = "llm"
    signals: ClassVar[tuple[str, ...]] = ("last",)
    score_offset: ClassVar[int] = 0
    # Whether ``select`` runs at a drop point that keeps every token (a pruner that decides per image
    # whether to drop at all); otherwise such a drop point keeps them without asking.
    always_selects: ClassVar[bool] = False

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        """The schedule for one image with ``n_tokens`` visual tokens entering the LLM."""
        raise NotImplementedError

    def transition_layers(self, info: ModelInfo, points: list[DropPoint]) -> range:
        """Decoder layers whose sub-layer transition variation accumulates (signal ``"transition"``),
        given this image's drop points; a drop point sees the sum over the window's layers before it."""
        return range(0)

    def select(self, tokens: PromptTokens) -> torch.Tensor:
        """Ascending indices into ``tokens.positions`` of the tokens that stay (at most ``tokens.keep``)."""
        raise NotImplementedError


@dataclass
class ScheduledPruner(LLMPruner):
    """An LLM-stage pruner with several drop points. ``keep`` is the mean number of visual tokens per
    decoder layer (an int: tokens per image; a float: a fraction of them), met by scaling the
    method's schedule shape (``fit_average``); ``schedule=[(layer, keep), ...]`` sets the drop points
    and the tokens kept from each instead (keeps as in ``keep``, relative to the tokens entering the LLM).
    """

    schedule: list | None = None

    depths: ClassVar[tuple[float, ...]] = ()  # drop layers as fractions of the decoder depth
    ratios: ClassVar[tuple[float, ...]] = ()  # tokens kept from each drop point, fractions of all

    def check(self, info: ModelInfo) -> None:
        if info.num_decoder_layers < 2:
            raise ValueError(
                f"the {self.name!r} pruner drops tokens between decoder layers; this decoder has one layer"
            )
        if self.schedule is not None:
            check_explicit(self.schedule, info.num_decoder_layers)
            self.schedule = [tuple(point) for point in self.schedule]

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        if self.schedule is not None:
            return explicit(self.schedule, n_tokens)
        average = budget_tokens(self.keep, n_tokens)
        return fit_average(list(self.depths), list(self.ratios), info.num_decoder_layers, n_tokens, average)


def top_k_sorted(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in ascending index order (ties: lower index first)."""
    order = torch.sort(scores.float(), descending=True, stable=True).indices[:k]
    return order.sort().values
