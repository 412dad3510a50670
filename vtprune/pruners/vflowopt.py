"""VFlowOpt (Yang et al., ICCV 2025): an importance map from the vision tower (the attention its global
tokens pay, plus patch entropy), pruning before the language model with the pruned tokens recycled,
then twice inside it; settings found by calibration (``vtprune.calibration``)."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import torch

from vtprune.core.schedule import DropPoint, budget_tokens, scaled_layers
from vtprune.core.tower_signals import GlobalTokenRule
from vtprune.pruners.base import LLMPruner, ModelInfo, PromptTokens, Reduction, VisionPruner, VisionTokens, top_k_sorted
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import register

# The reference drops inside the language model before layers 9 and 18 of LLaVA-OneVision's 28.
DROP_DEPTHS = (9 / 28, 18 / 28)


@dataclass(frozen=True)
class VFlowOptSettings:
    """VFlowOpt's knobs: ``vision_ratio`` (r_v, the share of an image's tokens the stage before the
    language model keeps, recycled ones included), ``llm_ratios`` (r_1, r_2: the share each drop inside
    it keeps), ``threshold`` (t: global tokens receive more than t times the mean attention), ``cell``
    (m: pruned tokens in the same m x m cell of the grid are recycled into one token) and ``entropy``
    (alpha_v: the entropy term's weight). ``target``: the mean share of the tokens per decoder layer
    they were chosen for."""

    vision_ratio: float
    llm_ratios: tuple[float, float]
    threshold: float
    cell: float
    entropy: float
    target: float

    def __post_init__(self) -> None:
        for name, value, low, high in (
            ("vision_ratio", self.vision_ratio, 0.0, 1.0),
            ("threshold", self.threshold, 0.0, math.inf),
            ("cell", self.cell, 1.0, math.inf),
            ("entropy", self.entropy, -math.inf, math.inf),
            ("target", self.target, 0.0, 1.0),
        ):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= value <= high:
                raise ValueError(f"VFlowOpt's {name} must be a number in [{low}, {high}], got {value!r}")
        ratios = self.llm_ratios
        if (
            not isinstance(ratios, (list, tuple))
            or len(ratios) != 2
            or not all(isinstance(r, numbers.Real) and not isinstance(r, bool) and 0 <= r <= 1 for r in ratios)
        ):
            raise ValueError(f"VFlowOpt's llm_ratios must be two numbers in [0, 1], got {ratios!r}")
        object.__setattr__(self, "llm_ratios", tuple(float(r) for r in ratios))

    def save(self, path: str | os.PathLike, **about) -> None:
        """Write these settings (and ``about``: how they were found) as JSON, for ``load``."""
        with open(path, "w") as f:
            json.dump({**asdict(self), "about": about}, f, indent=2)

    @classmethod
    def load(cls, path: str | os.PathLike) -> VFlowOptSettings:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"cannot read VFlowOpt settings from {str(path)!r}: {error}") from None
        names = ("vision_ratio", "llm_ratios", "threshold", "cell", "entropy", "target")
        try:
            return cls(**{k: data[k] for k in names if k in data})
        except TypeError as error:
            raise ValueError(
                f"{path} is not a VFlowOpt settings file (VFlowOptSettings.save writes one): {error}"
            ) from None


# The reference's settings on LLaVA-OneVision-7B, calibrated there for 10%, 25% and 50% of the tokens
# per layer on average (its entropy weight is 0 in all three).
PRESETS = (
    VFlowOptSettings(0.11662, (1.0, 0.6011), 39.265, 17.387, 0.0, 0.10),
    VFlowOptSettings(0.2651, (0.98334, 0.87733), 34.760, 15.581, 0.0, 0.25),
    VFlowOptSettings(0.72332, (0.74875, 0.487), 28.683, 11.757, 0.0, 0.50),
)


def drop_layers(num_layers: int) -> tuple[int, int]:
    """The two drop layers (the reference's depths, scaled); the second is ``num_layers`` (none) on a
    decoder too shallow for two."""
    first, second = (scaled_layers(list(DROP_DEPTHS), num_layers) + [num_layers, num_layers])[:2]
    return first, second


def layer_share(r_1: float, r_2: float, num_layers: int) -> float:
    """The mean share per decoder layer of the tokens entering the language model under r_1, r_2."""
    k1, k2 = drop_layers(num_layers)
    return (k1 + (k2 - k1) * r_1 + (num_layers - k2) * r_1 * r_2) / num_layers


def llm_ratios(share: float, r_1: float, num_layers: int) -> tuple[float, float]:
    """(r_1, r_2) whose ``layer_share`` is ``share``: r_2 from the budget as the reference's rule
    (``(L s - k1 - (k2 - k1) r_1) / ((L - k2) r_1)``); where that leaves [0, 1], r_2 at the bound and
    r_1 solved (within [0, 1]: the nearest share the drops can reach)."""
    k1, k2 = drop_layers(num_layers)
    if k1 >= num_layers:
        return 1.0, 1.0  # a one-layer decoder: nothing to drop inside it
    total = num_layers * share
    if k2 < num_layers and r_1 > 0:
        r_2 = (total - k1 - (k2 - k1) * r_1) / ((num_layers - k2) * r_1)
        if 0 <= r_2 <= 1:
            return r_1, r_2
        r_2 = min(1.0, max(0.0, r_2))
    else:
        r_2 = 1.0
    r_1 = (total - k1) / ((k2 - k1) + (num_layers - k2) * r_2)
    return min(1.0, max(0.0, r_1)), r_2


def cells_of(grid: tuple[int, int], cell: float, device) -> torch.Tensor:
    """(rows * cols,) the m x m cell (``cell`` = m, a real number) of each token of a raster grid."""
    rows, cols = grid
    r = torch.arange(rows, device=device).repeat_interleave(cols)
    c = torch.arange(cols, device=device).repeat(rows)
    per_row = math.floor((cols - 1) / cell) + 1
    return torch.div(r, cell, rounding_mode="floor").long() * per_row + torch.div(c, cell, rounding_mode="floor").long()


@dataclass
class VFlowOptPlan:
    """What VFlowOpt's two stages share: the budget, the settings (given, or the reference preset
    nearest the budget, chosen once the model is known) and the model's depth."""

    keep: int | float
    given: VFlowOptSettings | None = None
    overrides: dict = field(default_factory=dict)
    settings: VFlowOptSettings | None = None  # in force, once the model is known
    num_layers: int | None = None

    def resolve(self, info: ModelInfo) -> None:
        self.num_layers = info.num_decoder_layers
        base = self.given
        if base is None:
            n = info.visual_tokens or 576  # anyres images vary: LLaVA-1.5's count stands in
            target = budget_tokens(self.keep, n) / n
            base = min(PRESETS, key=lambda s: abs(s.target - target))
        self.settings = with_overrides(base, self.overrides)

    def vision_ratio(self, n_tokens: int) -> float:
        """r_v for an image of ``n_tokens``: the settings' own, unless the budget is out of the drops'
        reach with it (then the share the drops reach, scaled to the budget)."""
        s = self.settings
        target = budget_tokens(self.keep, n_tokens) / n_tokens
        if target >= s.vision_ratio:
            return min(1.0, target)  # nothing for the drops to do
        reached = layer_share(*llm_ratios(target / s.vision_ratio, s.llm_ratios[0], self.num_layers), self.num_layers)
        return s.vision_ratio if reached <= target / s.vision_ratio + 1e-9 else min(1.0, target / reached)

    def drop_points(self, entered: int) -> list[DropPoint]:
        """The drops for an image of which ``entered`` tokens came into the language model (after
        ``VFlowOptSelect``): r_1 as set, r_2 from the budget (``llm_ratios``)."""
        if isinstance(self.keep, numbers.Integral):
            share = self.keep / entered
        else:  # a fraction of the image's tokens, r_v of which entered
            share = self.keep / self.vision_ratio(entered)
        r_1, r_2 = llm_ratios(min(1.0, share), self.settings.llm_ratios[0], self.num_layers)
        k1, k2 = drop_layers(self.num_layers)
        first = entered - round(entered * (1 - r_1))
        points = [DropPoint(k1, first)] if k1 < self.num_layers else []  # a one-layer decoder has no drops
        if k2 < self.num_layers:
            points.append(DropPoint(k2, first - round(first * (1 - r_2))))
        return [p for p in points if p.keep < entered]

    @property
    def rule(self) -> GlobalTokenRule:
        return GlobalTokenRule(self.settings.threshold, self.settings.entropy)


def with_overrides(base: VFlowOptSettings, overrides: dict) -> VFlowOptSettings:
    """``base`` with some knobs replaced (``llm_ratio``: r_1)."""
    values = asdict(base)
    if "llm_ratio" in overrides:
        values["llm_ratios"] = (overrides["llm_ratio"], base.llm_ratios[1])
    values.update({k: v for k, v in overrides.items() if k != "llm_ratio"})
    return VFlowOptSettings(**values)


def _unresolved() -> VFlowOptPlan:
    return VFlowOptPlan(64)


class _SharedPlan:
    """What VFlowOpt's two stages share: the plan (``self.plan``), resolved once the model is known, and
    the tower score both rank by, read at the layer whose output the VLM takes."""

    plan: VFlowOptPlan

    def check(self, info: ModelInfo) -> None:
        self.plan.resolve(info)

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        return list(info.feature_layers)

    def tower_score_rule(self) -> GlobalTokenRule:
        return self.plan.rule


@dataclass
class VFlowOptSelect(_SharedPlan, VisionPruner):
    """VFlowOpt's stage before the language model: each image keeps its tokens of highest importance
    (the tower score of ``GlobalTokenRule``), r_v of them; with ``recycle`` and a patch grid, the others
    are grouped by the m x m cell they lie in and each group becomes one token, its members' mean
    weighted by importance, at its most important member's place, counted in the r_v."""

    recycle: bool = True
    plan: VFlowOptPlan = field(default_factory=_unresolved, repr=False)

    name: ClassVar[str] = "vflowopt.select"
    merges: ClassVar[bool] = True
    merges_at_anchor: ClassVar[bool] = True

    def keep_count(self, n: int) -> int:
        return n if self.plan.num_layers is None else max(1, min(n, round(self.plan.vision_ratio(n) * n)))

    def reduce(self, tokens: VisionTokens) -> Reduction:
        s, n, budget = tokens.cls_attention.float(), len(tokens), tokens.keep
        if budget >= n or not self.recycle or tokens.grid is None:
            return Reduction(top_k_sorted(s, budget))
        cells = cells_of(tokens.grid, self.plan.settings.cell, s.device)
        kept = budget
        while True:  # recycled tokens count in the budget: fewer kept as the pruned span more cells
            staying = top_k_sorted(s, kept)
            pruned = torch.ones(n, dtype=torch.bool, device=s.device)
            pruned[staying] = False
            groups = cells[pruned].unique()
            if kept + groups.numel() <= budget:
                break
            kept = budget - groups.numel()
            if kept < 0:
                return Reduction(top_k_sorted(s, budget))  # more cells than the budget: no recycling
        members = pruned.nonzero().flatten()
        out, weights = [], []
        for c in groups.tolist():
            g = members[cells[members] == c]
            g = g[torch.sort(s[g], descending=True, stable=True).indices]  # the most important first: the anchor
            out.append(g)
            weights.append(s[g].clamp_min(1e-12))
        return Reduction(staying, tuple(out), tuple(weights))

    def options(self) -> dict:
        return {"keep": self.plan.keep, "recycle": self.recycle, "budget": self.budget}


@dataclass
class VFlowOptDrop(_SharedPlan, LLMPruner):
    """VFlowOpt's drops inside the language model, before layers 9 and 18 of 28 (scaled): each keeps
    r_1, then r_2, of the image's tokens, those of highest importance from the tower (a recycled token
    has its anchor's); no attention of the language model is read."""

    plan: VFlowOptPlan = field(default_factory=_unresolved, repr=False)

    name: ClassVar[str] = "vflowopt.drop"
    signals: ClassVar[tuple[str, ...]] = ("tower",)

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        if self.plan.settings is None:
            self.plan.resolve(info)
        return self.plan.drop_points(n_tokens)

    def score(self, tokens: PromptTokens) -> torch.Tensor:
        return tokens.tower_attention


@register
@dataclass
class VFlowOpt(Pipeline):
    """VFlowOpt as one pruner: ``VFlowOptSelect`` before the language model, ``VFlowOptDrop`` inside it.

    ``keep`` is the mean number of visual tokens per decoder layer (int, or a fraction of an image's
    tokens; default 64), the reference's budget. The settings (r_v, r_1, t, m, alpha_v; r_2 follows from
    the budget) are ``settings`` (a ``VFlowOptSettings``, or the path of a file ``vtprune calibrate``
    wrote), or else the reference's preset nearest the budget (calibrated on LLaVA-OneVision-7B); any of
    ``vision_ratio``, ``llm_ratio`` (r_1), ``threshold``, ``cell`` and ``entropy`` replaces its value.
    ``recycle=False`` drops the tokens the first stage prunes instead of recycling them.
    """

    keep: int | float = 64
    settings: VFlowOptSettings | str | os.PathLike | None = None
    vision_ratio: float | None = None
    llm_ratio: float | None = None
    threshold: float | None = None
    cell: float | None = None
    entropy: float | None = None
    recycle: bool = True
    budget: str = field(default="per_frame", kw_only=True)
    pruners: list = field(init=False, default_factory=list)

    name: ClassVar[str] = "vflowopt"
    stage: ClassVar[str] = "vision+llm"

    def __post_init__(self) -> None:
        if not isinstance(self.recycle, bool):
            raise ValueError(f"recycle must be True or False, got {self.recycle!r}")
        select = VFlowOptSelect(keep=self.keep, recycle=self.recycle, budget=self.budget)  # checks keep
        given = self.settings
        if isinstance(given, (str, os.PathLike)):
            given = VFlowOptSettings.load(given)
        elif given is not None and not isinstance(given, VFlowOptSettings):
            raise ValueError(f"settings must be a VFlowOptSettings or a settings file's path, got {given!r}")
        overrides = self._overrides()
        with_overrides(given or PRESETS[0], overrides)  # checks the values now, before any model
        select.plan = plan = VFlowOptPlan(select.keep, given, overrides)
        self.pruners = [select, VFlowOptDrop(keep=select.keep, budget=self.budget, plan=plan)]
        super().__post_init__()

    def _overrides(self) -> dict:
        given = {
            "vision_ratio": self.vision_ratio,
            "llm_ratio": self.llm_ratio,
            "threshold": self.threshold,
            "cell": self.cell,
            "entropy": self.entropy,
        }
        return {k: v for k, v in given.items() if v is not None}

    def options(self) -> dict:
        return {
            "keep": self.keep,
            "settings": str(self.settings) if self.settings is not None else None,
            **self._overrides(),
            "recycle": self.recycle,
            "budget": self.budget,
        }
