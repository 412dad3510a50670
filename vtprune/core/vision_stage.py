"""The vision stage: choose each image's visual tokens before the LLM, and shorten the prompt to them.

One call, ``VisionStage.run``, takes a forward's images (``Visual``: features and layout) and where
their placeholders sit (``VisualLayout``), and returns everything the model then needs
(``VisionOutcome``): the features to scatter (kept and fixed tokens, and merged ones), the shortened
prompt tensors, what was kept (``PruneStats``), the layout of what stays (for LLM-stage pruners
after it) and the translation later decode steps need. The model-family adapter only wraps the
features in the model's output objects and runs the forward.

Three index spaces are in play (see ``image_parts.py``): prunable indices (what pruners return and
``PruneStats`` reports), token positions within an image, and positions in the prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch

from vtprune.core.compaction import Compaction
from vtprune.core.image_parts import ImagePart, ImageParts, crop_weights, split_budget
from vtprune.core.layout import VisualLayout
from vtprune.core.paired_text import paired_text
from vtprune.core.shortening import DecodeTranslation, shorten_prompt
from vtprune.core.stats import PruneStats
from vtprune.core.tokens import Reduction, VisionTokens


class VisionPruner(Protocol):
    """What the stage asks of a vision-stage pruner (``vtprune.VisionPruner`` documents each member)."""

    name: str
    crop_budget: str
    reads_text: bool

    def keep_count(self, n: int) -> int: ...

    def reduce(self, tokens: VisionTokens) -> Reduction: ...


@dataclass(frozen=True)
class Visual:
    """One image, or one video frame (or whole video), as the stage prunes it: ``features`` (n, D) its
    tokens as the model scatters them, ``parts`` their layout; ``number``: the image's (video's)
    index among the encoder's outputs of its ``modality``."""

    modality: str
    number: int
    features: torch.Tensor
    parts: ImageParts


def visuals_of(modality: str, features: list[torch.Tensor], layouts: list, budget: str) -> list[Visual]:
    """What the stages prune as one image each: every image, or every frame of a video (``budget``
    ``"per_frame"``) or every whole video (``"per_video"``); ``layouts``: per feature tensor, its
    ``ImageParts`` (images) or ``VideoFrames`` (videos)."""
    out = []
    for number, (f, layout) in enumerate(zip(features, layouts)):
        if modality == "image":
            out.append(Visual(modality, number, f, layout))
            continue
        start = 0
        for parts in layout.items(budget):
            out.append(Visual(modality, number, f[start : start + parts.n_tokens], parts))
            start += parts.n_tokens
    return out


@dataclass
class Prompt:
    """The prompt tensors a forward received, all (B, L): what the stage shortens.

    position_ids: (B or 1, L) positions that close up over dropped tokens, or None; kept_positions,
    for families whose kept tokens keep their original positions (M-RoPE): computes the (R, B, L)
    positions of the full prompt, called only when tokens drop. aligned: other per-token inputs
    shortened with ``input_ids`` (e.g. ``mm_token_type_ids``). embed: the language model's input
    embedding (ids -> (.., D)), for pruners that read each image's paired text (``reads_text``);
    special_ids: token ids never counted as such text (the model's special tokens); text_end: the
    prompt's length when generated tokens follow it in ``input_ids`` (never text of an image).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    pad_token_id: int
    labels: torch.Tensor | None = None
    position_ids: torch.Tensor | None = None
    kept_positions: Callable[[], torch.Tensor] | None = None
    aligned: dict = field(default_factory=dict)
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None
    special_ids: frozenset = frozenset()
    text_end: int | None = None  # where the prompt ends when tokens follow it (a generation's candidates)


@dataclass
class VisionOutcome:
    """What the vision stage made of one forward's images.

    tokens: per modality, per image (video) number, the (n_i, D) features the model scatters into
        the placeholders that stay; None when nothing was dropped (the encoder's output stands).
    prompt: the shortened prompt tensors (``input_ids``, ``attention_mask``, ``position_ids``,
        ``labels`` and the aligned inputs, each (B, L') or (R, B, L')), None when nothing was dropped.
    full_positions: (R, B, L) the full prompt's positions when ``Prompt.kept_positions`` gave them.
    remaining: per visual, (modality, layout of its tokens that stay), for LLM-stage pruners after.
    translation: how later decode steps map onto the shortened cache, None when nothing was dropped.
    """

    stats: PruneStats
    compaction: Compaction
    tokens: dict | None
    prompt: dict | None
    full_positions: torch.Tensor | None
    remaining: list[tuple[str, ImageParts]]
    translation: DecodeTranslation | None


class VisionStage:
    """``keeps_positions``: kept (and merged) tokens keep their original positions (M-RoPE families)
    instead of closing up as in a prompt written with fewer image tokens; a merged token then sits
    at its anchor's place."""

    def __init__(
        self, pruner: VisionPruner | None, num_decoder_layers: int, keeps_positions: bool, tower: str | None = None
    ):
        self.pruner = pruner  # None: only a tower-stage pruner (``tower``, its name) reduced the tokens
        self.name = pruner.name if pruner is not None else tower
        self.num_decoder_layers = num_decoder_layers
        self.keeps_positions = keeps_positions
        # Merged tokens take their anchor's place on position-keeping models, and for pruners that ask.
        self.merged_at_anchor = keeps_positions or bool(getattr(pruner, "merges_at_anchor", False))

    def run(self, visuals: list[Visual], layout: VisualLayout, prompt: Prompt) -> VisionOutcome:
        for v in visuals:
            if not bool(torch.isfinite(v.features).all()):
                # Scores of NaN features order arbitrarily (a greedy selection may even repeat a token).
                raise ValueError(
                    f"{v.modality} {v.number} has non-finite features (NaN or inf, e.g. from non-finite pixel "
                    f"values): the {self.name!r} pruner cannot rank its tokens; check the inputs"
                )
        reads_text = self.pruner is not None and self.pruner.reads_text
        texts = self._paired_texts(layout, prompt) if reads_text else None
        both = [
            reduce_visual(self.pruner, v.features, v.parts, None if texts is None else texts[i])
            for i, v in enumerate(visuals)
        ]
        reductions, reported = [r for r, _ in both], [r for _, r in both]
        # Placeholders that stay: the kept tokens' and, for each merged token, its anchor's.
        slots = layout.per_sample([_slots(r) for r in reductions])
        comp = Compaction.from_keep(layout.keep_mask(slots, prompt.input_ids.device))
        sample_kept = layout.sample_kept(layout.per_sample([r.kept for r in reported]))
        merged = layout.sample_groups(layout.per_sample([r.groups for r in reported]))
        stats = PruneStats(
            kept=sample_kept,
            layer_tokens=[[int(k.numel()) + len(m)] * self.num_decoder_layers for k, m in zip(sample_kept, merged)],
            merged=merged,
        )
        # The tokens entering the LLM: kept ones, and merged ones where they take their anchor's place.
        remaining = [
            (v.modality, v.parts.after_keep(_slots(r) if self.merged_at_anchor else r.kept))
            for v, r in zip(visuals, reductions)
        ]
        if comp.is_identity:
            return VisionOutcome(stats, comp, None, None, None, remaining, None)
        tokens: dict = {}
        for v, r in zip(visuals, reductions):
            mine = kept_features(v, r, merged_at_anchor=self.merged_at_anchor)
            tokens.setdefault(v.modality, {}).setdefault(v.number, []).append(mine)
        tokens = {m: [torch.cat(parts) for parts in per_number.values()] for m, per_number in tokens.items()}
        short, full_positions = self._shorten(comp, prompt)
        mask = short["attention_mask"]
        translation = DecodeTranslation(
            comp, None if mask is None or bool(mask.all()) else mask, shift_positions=not self.keeps_positions
        )
        return VisionOutcome(stats, comp, tokens, short, full_positions, remaining, translation)

    def _paired_texts(self, layout: VisualLayout, prompt: Prompt) -> list[torch.Tensor]:
        """Per visual, the input embeddings (T, D) of the text paired with it (``paired_text``)."""
        if prompt.embed is None:
            raise ValueError(f"the {self.name!r} pruner reads each image's text, which this model does not give")
        ids = prompt.input_ids if prompt.text_end is None else prompt.input_ids[:, : prompt.text_end]
        mask = prompt.attention_mask
        mask = mask if mask is None or prompt.text_end is None else mask[:, : prompt.text_end]
        where = paired_text(ids, mask, layout, prompt.special_ids, or_before=self.pruner.text_or_before)
        sample = {item: b for b, items in enumerate(layout.items) for item in items}
        with torch.no_grad():
            return [prompt.embed(prompt.input_ids[sample[i], p]) for i, p in enumerate(where)]

    def _shorten(self, comp: Compaction, prompt: Prompt) -> tuple[dict, torch.Tensor | None]:
        positions = None if self.keeps_positions else prompt.position_ids
        short = shorten_prompt(
            comp, prompt.input_ids, prompt.attention_mask, positions, prompt.labels, prompt.pad_token_id
        )
        full_positions = None
        if self.keeps_positions:
            full_positions = prompt.kept_positions()
            short["position_ids"] = torch.stack([comp.gather(row, fill=0) for row in full_positions])
        for name, value in prompt.aligned.items():
            short[name] = comp.gather(value, fill=0)
        return short, full_positions


def reduce_visual(
    pruner: VisionPruner | None, features: torch.Tensor, parts: ImageParts, text: torch.Tensor | None = None
) -> tuple[Reduction, Reduction]:
    """One image's reduction (prunable indices) twice: as the model gets it (the tokens whose
    placeholders stay, and merged groups whose features are averaged) and as ``PruneStats`` reports
    it (tokens that stay alone, and per merged token all the original tokens behind it).

    They differ when a tower-stage pruner merged patches (``parts.tower_ids``): every merged token
    arrives as copies on its patches, and enters the language model once, at its first patch (whose
    features are the merged token's, exactly); ``pruner`` (a vision-stage pruner after the tower, or
    None) then chooses among those tokens.
    """
    if parts.tower_ids is None:
        if pruner is None:
            r = Reduction(torch.arange(parts.prunable.numel(), device=features.device))
        else:
            r = select_in_parts(pruner, features, parts, text)
        return r, r
    firsts, members = parts.tower_tokens()
    if pruner is None:
        r = Reduction(firsts.to(features.device))
    else:
        positions = torch.cat([parts.prunable[firsts], parts.fixed]).sort().values
        chosen = select_in_parts(pruner, features[positions.to(features.device)], parts.restricted(positions), text)
        groups = tuple(firsts[g.cpu()] for g in chosen.groups)
        r = Reduction(firsts[chosen.kept.cpu()].to(features.device), groups, chosen.weights)
    behind = dict(zip(firsts.tolist(), members))
    alone = [k for k in r.kept.tolist() if behind[k].numel() == 1]
    groups = [behind[k] for k in r.kept.tolist() if behind[k].numel() > 1]
    groups += [torch.cat([behind[k] for k in g.tolist()]).sort().values for g in r.groups]
    groups.sort(key=lambda g: int(g[0]))
    return r, Reduction(torch.tensor(alone, dtype=torch.long), tuple(groups))


def select_in_parts(
    pruner: VisionPruner, features: torch.Tensor, parts: ImageParts, text: torch.Tensor | None = None
) -> Reduction:
    """What ``pruner`` keeps (and merges) of one image's tokens, as prunable indices.

    features: (n_tokens, D), the image's tokens after the projector. The image's budget (counted on
    its prunable tokens) is shared across its parts in proportion to their sizes; each part is
    scored on its own, with its own grid and tower signals (and the image's paired ``text``, (T, D)).
    """
    prunable = parts.prunable
    keep = pruner.keep_count(prunable.numel())
    budgets = split_budget(keep, [p.index.numel() for p in parts.parts])
    scored = list(zip(parts.parts, budgets))
    if pruner.crop_budget == "global" and parts.crops and parts.cls_attention is not None:
        scored = scored[:-1] + _global_crop_budgets(parts, budgets[-1])
    chosen, groups, weights, weighted = [], [], [], False
    for part, part_keep in scored:
        if part_keep == 0:
            continue
        cls = None if parts.cls_attention is None else parts.cls_attention[part.index]
        keys = None if parts.keys is None else parts.keys[part.index]
        tokens = VisionTokens(
            features=features[part.index.to(features.device)],
            keep=part_keep,
            grid=part.grid,
            cls_attention=cls,
            keys=keys,
            text=text,
        )
        reduction = pruner.reduce(tokens)
        _check_reduction(pruner, reduction, len(tokens), part_keep)
        chosen.append(part.index[reduction.kept.cpu()])
        groups += [part.index[g.cpu()] for g in reduction.groups]
        weighted = weighted or bool(reduction.weights)
        weights += reduction.weights or [torch.ones(g.numel()) for g in reduction.groups]
    weights = tuple(weights) if weighted else ()
    if len(parts.parts) == 1 and prunable.numel() == parts.n_tokens:
        return Reduction(chosen[0].to(features.device), tuple(groups), weights)
    positions = torch.cat(chosen).sort().values
    as_prunable = tuple(torch.searchsorted(prunable, g) for g in groups)
    return Reduction(torch.searchsorted(prunable, positions).to(features.device), as_prunable, weights)


def _check_reduction(pruner: VisionPruner, r: Reduction, n: int, keep: int) -> None:
    """Raise unless ``r`` keeps ascending, distinct indices in [0, n) and merges disjoint groups of the
    others, at most ``keep`` tokens in all: the placeholders that stay must match the tokens exactly."""
    kept = r.kept
    if not isinstance(kept, torch.Tensor) or kept.dim() != 1 or kept.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"the {pruner.name!r} pruner must keep a 1-D integer tensor of indices, got {kept!r}")
    if not r.fits(n, keep):
        raise ValueError(
            f"the {pruner.name!r} pruner must keep at most {keep} ascending, distinct indices in [0, {n}) (merged "
            f"groups counted, disjoint from them); got kept={kept.tolist()} and {len(r.groups)} merged groups"
        )


def _global_crop_budgets(parts: ImageParts, keep: int) -> list[tuple[ImagePart, int]]:
    """The crops' share of the budget split across crops by the base image's attention (GlobalCom²)."""
    base = parts.parts[0].index
    sizes = [c.index.numel() for c in parts.crops]
    weights = crop_weights(parts.cls_attention[base], parts.base_regions, sizes)
    return list(zip(parts.crops, split_budget(keep, sizes, weights)))


def _slots(r: Reduction) -> torch.Tensor:
    """Prunable indices whose placeholders stay for a reduction: kept tokens and merged tokens' anchors."""
    if not r.groups:
        return r.kept
    return torch.cat([r.kept, r.anchors.to(r.kept.device)]).sort().values


def token_places(parts: ImageParts, r: Reduction) -> torch.Tensor:
    """(k + fixed + merged,) ascending: the image token each row of ``kept_features(..., merged_at_anchor=True)``
    stands at (a kept or fixed token's own, a merged token's anchor's): where a position-keeping model
    places it."""
    staying = parts.token_positions(r.kept)
    if not r.groups:
        return staying
    return torch.cat([staying, parts.prunable[r.anchors.cpu()]]).sort().values


def kept_features(v: Visual, r: Reduction, merged_at_anchor: bool) -> torch.Tensor:
    """(k + fixed + merged, D): what the model gets for one image after reduction ``r``: kept and fixed tokens in prompt
    order, then each merged token (the (weighted) mean of its group), or, with ``merged_at_anchor``, each merged
    token at its anchor's place."""
    f = v.features
    staying = v.parts.token_positions(r.kept)
    kept = f[staying.to(f.device)]
    if not r.groups:
        return kept
    prunable = v.parts.prunable
    if r.weights:
        rows = [f[prunable[g.cpu()].to(f.device)].float() for g in r.groups]
        weights = [w.to(f.device).float() for w in r.weights]
        merged = torch.stack([(w[:, None] * x).sum(0) / w.sum() for w, x in zip(weights, rows)]).to(f.dtype)
    else:
        merged = torch.stack([f[prunable[g.cpu()].to(f.device)].float().mean(0) for g in r.groups]).to(f.dtype)
    tokens = torch.cat([kept, merged])
    if not merged_at_anchor:
        return tokens
    # Order by place in the prompt: the anchors' token positions next to the kept and fixed ones.
    places = torch.cat([staying, prunable[r.anchors.cpu()]])
    return tokens[places.argsort().to(f.device)]
