"""Composition: a tower-stage pruner, a vision-stage pruner, LLM-stage pruners at increasing decoder
layers, then a cache policy for the decode steps (each stage optional, in that order).

    vtprune.apply(model, vtprune.Pipeline([vtprune.DivPrune(keep=192), vtprune.FastV(layer=2, keep=64)]))
    vtprune.apply(model, [vtprune.DivPrune(keep=192), vtprune.FastV(layer=2, keep=64)])   # the same

A vision-stage pruner after a tower-stage one chooses among the tokens leaving the tower; LLM-stage
budgets count the visual tokens that enter the language model (after the vision stage);
``handle.last.kept`` indexes the original visual tokens.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import ClassVar

from vtprune.core.llm_signals import check_signals
from vtprune.core.schedule import check_llm_order
from vtprune.core.tokens import ModelInfo
from vtprune.pruners.base import DecodePruner, LLMPruner, Pruner, ScheduledPruner, TowerPruner, VisionPruner


@dataclass
class Pipeline:
    pruners: list

    name: ClassVar[str] = "pipeline"
    # Whether the LLM-stage pruners only gate an image's tokens off in late layers, so that the vision
    # stage alone is the method's main reduction (ToDRE): an engine that cannot drop tokens inside the
    # decoder (vLLM) may run the vision stage alone, saying so.
    late_gate: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not isinstance(self.pruners, (list, tuple)) or not self.pruners:
            raise TypeError(f"a Pipeline takes a non-empty list of pruner objects, got {self.pruners!r}")
        self.pruners = list(self.pruners)
        bad = [p for p in self.pruners if not isinstance(p, Pruner) or isinstance(p, Pipeline)]
        if bad:
            raise TypeError(f"a Pipeline takes pruner objects such as vtprune.DivPrune(keep=192); got {bad!r}")
        tower = [p for p in self.pruners if isinstance(p, TowerPruner)]
        if len(tower) > 1:
            raise ValueError(f"a Pipeline takes at most one tower-stage pruner, got {[p.name for p in tower]}")
        if tower and self.pruners[0] is not tower[0]:
            raise ValueError(
                f"the tower-stage pruner ({tower[0].name!r}) must come first in a Pipeline: it runs inside the "
                f"vision tower, before every other stage"
            )
        vision = [p for p in self.pruners if isinstance(p, VisionPruner)]
        if len(vision) > 1:
            raise ValueError(f"a Pipeline takes at most one vision-stage pruner, got {[p.name for p in vision]}")
        if vision and self.pruners[len(tower)] is not vision[0]:
            raise ValueError(
                f"the vision-stage pruner ({vision[0].name!r}) must come first in a Pipeline (after a tower-stage "
                f"pruner): it runs before the language model"
            )
        decode = [p for p in self.pruners if isinstance(p, DecodePruner)]
        if len(decode) > 1:
            raise ValueError(f"a Pipeline takes at most one cache policy, got {[p.name for p in decode]}")
        if decode and self.pruners[-1] is not decode[0]:
            raise ValueError(
                f"the cache policy ({decode[0].name!r}) must come last in a Pipeline: it acts in the decode steps, "
                f"after every other stage"
            )
        if vision and vision[0].merges and not vision[0].merges_at_anchor and self.llm:
            raise ValueError(
                f"{vision[0].name!r} merges tokens after the kept ones; LLM-stage pruners after it are not supported "
                f"(after a pruner whose merged tokens take their anchor's place, as VFlowOpt's, they are)"
            )
        # A tower-stage pruner counts per frame, whatever follows; a cache policy counts nothing.
        after_tower = [p for p in self.pruners[len(tower) :] if not isinstance(p, DecodePruner)]
        if len({p.budget for p in after_tower}) > 1:
            raise ValueError(
                f"the pruners of a Pipeline must count a video's tokens the same way; got budget="
                f"{[p.budget for p in after_tower]} (give every pruner budget='per_frame' or every one 'per_video')"
            )
        for earlier, later in zip(self.pruners, self.pruners[1:]):
            # Scheduled pruners' keep is a mean per layer: their drop points are checked in check(). A
            # tower pruner's int keep counts per tower input (an anyres image's crops each).
            unchecked_after = isinstance(later, (ScheduledPruner, DecodePruner))
            if unchecked_after or isinstance(earlier, (ScheduledPruner, TowerPruner)):
                continue
            if _comparable(earlier.keep, later.keep) and later.keep > earlier.keep:
                raise ValueError(
                    f"in a Pipeline a later pruner cannot keep more than an earlier one: {later.name!r} keeps "
                    f"{later.keep} after {earlier.name!r} kept {earlier.keep}"
                )
        for earlier, later in zip(self.llm, self.llm[1:]):
            if isinstance(later, ScheduledPruner) and later.schedule is None:
                raise ValueError(
                    f"{later.name!r} after {earlier.name!r}: a multi-drop pruner fits its drop points to a mean "
                    f"over all decoder layers, which another LLM-stage pruner before it would break; give it "
                    f"an explicit schedule=[(layer, keep), ...] after {earlier.name!r}'s layers"
                )

    @property
    def tower(self) -> TowerPruner | None:
        return self.pruners[0] if isinstance(self.pruners[0], TowerPruner) else None

    @property
    def vision(self) -> VisionPruner | None:
        return next((p for p in self.pruners if isinstance(p, VisionPruner)), None)

    @property
    def decode(self) -> DecodePruner | None:
        return self.pruners[-1] if isinstance(self.pruners[-1], DecodePruner) else None

    @property
    def budget(self) -> str:
        """How the stages after the tower count a video's tokens."""
        counting = [p for p in self.pruners if not isinstance(p, DecodePruner)] or self.pruners
        return counting[-1].budget

    @classmethod
    def of_two(cls, names: str, keep: int | float, **options) -> Pipeline:
        """The Pipeline written ``"a+b"`` (registered names): ``a`` keeps twice ``keep`` (a fraction at
        most 1.0) and ``b`` keeps what ``b`` alone would keep at ``keep`` (a fraction counts the tokens
        ``b`` receives, so it is divided by ``a``'s): the tokens entering the language model are as
        many as with ``b`` alone. ``options`` go to both (e.g. ``budget``). What the benchmark scripts
        compare."""
        from vtprune.registry import pruner_class

        parts = names.split("+")
        if len(parts) != 2:
            raise ValueError(f"write two registered pruner names joined by '+', e.g. 'tome+divprune'; got {names!r}")
        first, second = (pruner_class(name) for name in parts)
        if isinstance(keep, float):
            twice = min(1.0, 2 * keep)
            return cls([first(keep=twice, **options), second(keep=keep / twice, **options)])
        return cls([first(keep=2 * keep, **options), second(keep=keep, **options)])

    @property
    def llm(self) -> list[LLMPruner]:
        return [p for p in self.pruners if isinstance(p, LLMPruner)]

    def check(self, info: ModelInfo) -> None:
        for p in self.pruners:
            p.check(info)
        rule = self.tower_score_rule()
        # The tower's attention is captured once per forward, scored one way: a rule replaces the CLS row.
        cls_readers = [p.name for p in self.pruners if p.tower_score_rule() is None and p.tower_attention_layers(info)]
        if rule is not None and cls_readers:
            raise ValueError(
                f"{cls_readers} read the tower's CLS attention, but another pruner of this Pipeline scores the "
                f"tower's attention by its own rule ({rule}), and the tower is read once per forward: use one or "
                f"the other"
            )
        for p in self.llm:
            check_signals(p.name, p.signals)
        if info.visual_tokens is None:
            return
        n = info.visual_tokens
        for p in (self.tower, self.vision):
            n = n if p is None else p.keep_count(n)
        check_llm_order(self.llm, info, n)

    def tower_attention_layers(self, info: ModelInfo) -> list[int]:
        """The tower layers whose CLS attention any of the pruners reads, ascending."""
        return sorted({layer for p in self.pruners for layer in p.tower_attention_layers(info)})

    def tower_key_layers(self, info: ModelInfo) -> list[int]:
        return sorted({layer for p in self.pruners for layer in p.tower_key_layers(info)})

    def tower_score_rule(self):
        """The tower score rule the pruners ask for (``Pruner.tower_score_rule``), at most one kind."""
        rules = {r for p in self.pruners if (r := p.tower_score_rule()) is not None}
        if len(rules) > 1:
            raise ValueError(f"the pruners of a Pipeline ask for different tower scores: {sorted(map(str, rules))}")
        return next(iter(rules), None)

    def tower_reader(self, info: ModelInfo) -> Pruner | None:
        """The first of the pruners that scores with what it reads inside the vision tower, if any."""
        return next((p for p in self.pruners if p.reads_tower(info)), None)

    def options(self) -> dict:
        return {"pruners": [f"{p.name}({p.options()})" for p in self.pruners]}


def _comparable(a, b) -> bool:
    return isinstance(a, numbers.Integral) == isinstance(b, numbers.Integral)


def as_pipeline(config) -> Pipeline:
    return config if isinstance(config, Pipeline) else Pipeline([config])
