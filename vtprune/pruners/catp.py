"""CATP (Li et al., AAAI 2026): pruning for multimodal in-context learning, where a prompt holds several
image-text demonstrations and a query. Before the language model, each image keeps a diverse set of
tokens aligned with its own text; inside it, the demonstrations' images are pruned together by how
the query attends to them and resembles them, then the query's image by its likeness to what is left
of the demonstrations. No reference code is public: this follows the paper's equations, and where
the paper is silent the choices are written here and in docs/pruners.md."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F

from vtprune.core.schedule import DropPoint
from vtprune.ops.facility import facility_location, rescaled_cosine
from vtprune.pruners.base import (
    LLMPruner,
    ModelInfo,
    Reduction,
    SampleTokens,
    VisionPruner,
    VisionTokens,
    top_k_sorted,
)
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import register

# The paper prunes inside LLaVA-NeXT-7B's 32 decoder layers after layer K = 6 (10 of 40 for 13B);
# other depths scale 6/32.
DEPTH = 6 / 32


@dataclass
class CATPPlan:
    """What CATP's two stages share: the budget and the layer K of the drops inside the model.

    ``keep`` (an int: visual tokens per image at the end; a float f: the fraction of them) sets the
    paper's pruning ratio R = 1 - keep / S for an image of S tokens. Before the language model each
    image keeps floor(S (1 - R/2)), halfway; inside, the demonstrations' images keep keep tokens each
    on average (shared among them), then the query's image keeps its own.
    """

    keep: int | float
    layer: int | None = None
    k: int | None = None  # K, once the model is known

    def resolve(self, info: ModelInfo) -> None:
        n = info.num_decoder_layers
        if n < 4:
            raise ValueError(
                f"the 'catp' pruner drops after decoder layers K and K+1 (K >= 1, comparing its attention with "
                f"layer K-1's) and needs a decoder of at least 4 layers; this one has {n}"
            )
        if self.layer is not None and not 1 <= self.layer <= n - 3:
            raise ValueError(f"layer must be in [1, {n - 3}] for this {n}-layer decoder (K), got {self.layer}")
        self.k = self.layer if self.layer is not None else min(n - 3, max(1, round(DEPTH * n)))

    def entering(self, n: int) -> int:
        """Tokens of an ``n``-token image that enter the language model: floor(n (1 - R/2))."""
        if isinstance(self.keep, numbers.Integral):
            return (n + min(self.keep, n)) // 2
        return max(1, math.floor(n * (1 + self.keep) / 2))

    def final(self, entered: int) -> int:
        """Tokens of an image that stay after the drops inside, of the ``entered`` ones: ``keep`` (an
        int), or round(2 f / (1 + f) x entered) for a fraction f (f of the image's tokens, up to the
        rounding of the first stage, which ``entered`` no longer shows)."""
        if isinstance(self.keep, numbers.Integral):
            return min(self.keep, entered)
        return max(1, min(entered, round(2 * self.keep * entered / (1 + self.keep))))


def _check_weight(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)


@dataclass
class CATPSelect(VisionPruner):
    """CATP's first stage, before the language model: each image keeps ``keep_count`` tokens by the
    standard greedy maximisation of a facility-location diversity over its tokens plus ``align`` (the
    paper's lambda_1) times their alignment with the image's paired text, both in rescaled cosine
    similarity (cos + 1) / 2 (``vtprune.ops.facility_location``). The text is the mean input embedding
    of the prompt's text after the image up to the next one (``VisionTokens.text``); an image with no
    text after it is chosen by diversity alone."""

    align: float = 0.7
    plan: CATPPlan | None = field(default=None, repr=False)  # shared with CATPDrop; None: its own

    name: ClassVar[str] = "catp.select"
    reads_text: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.align = _check_weight("align", self.align)
        self.plan = self.plan or CATPPlan(self.keep)

    def keep_count(self, n: int) -> int:
        return self.plan.entering(n)

    def reduce(self, tokens: VisionTokens) -> Reduction:
        if tokens.keep >= len(tokens):
            return Reduction(torch.arange(len(tokens), device=tokens.features.device))
        bonus = None
        if tokens.text is not None and tokens.text.shape[0]:
            bonus = self.align * rescaled_cosine(tokens.features, tokens.text.float().mean(0, keepdim=True))[:, 0]
        return Reduction(facility_location(tokens.features, tokens.keep, bonus).sort().values)

    def options(self) -> dict:
        return {"keep": self.plan.keep, "align": self.align, "budget": self.budget}


def _cosine(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(n,) plain cosine similarity of the rows of ``x`` (n, D) with ``reference`` (D,), fp32."""
    return F.cosine_similarity(x.float(), reference.float()[None], dim=-1)


@dataclass
class CATPDrop(LLMPruner):
    """CATP's second stage, inside the language model, on a prompt of demonstrations and a query (its
    last image is the query's, the others the demonstrations').

    After decoder layer K (``CATPPlan``), the demonstrations' image tokens are ranked *together*:
    max(0, A^K - A^(K-1)) (the growth of the last prompt token's head-mean attention to the token from
    layer K-1 to K) plus ``relevance`` (lambda_2) times the cosine of its hidden state with the mean
    hidden state of the query (the query image's tokens and the text after it); they keep ``keep``
    per image in all, shared as the ranking falls. After layer K+1 the query's image keeps the tokens
    whose hidden states are most like the mean of the demonstrations' remaining image tokens. A prompt
    with one image (no demonstrations) skips the first drop and ranks the image by its likeness to the
    mean hidden state of the text after it (our fallback; the paper defines none).
    """

    relevance: float = 0.6
    plan: CATPPlan | None = field(default=None, repr=False)  # shared with CATPSelect; None: its own
    budget: str = field(default="per_video", kw_only=True)

    name: ClassVar[str] = "catp.drop"
    signals: ClassVar[tuple[str, ...]] = ("last", "last_before", "hidden")
    score_offset: ClassVar[int] = 1
    joint: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.relevance = _check_weight("relevance", self.relevance)
        if self.budget != "per_video":
            raise ValueError(
                f"budget={self.budget!r}: CATP's drops inside the language model give a prompt's images roles (the "
                f"last is the query, the others its demonstrations), and a video takes one role as one image: only "
                f"budget='per_video'"
            )
        self.plan = self.plan or CATPPlan(self.keep)

    def check(self, info: ModelInfo) -> None:
        self.plan.resolve(info)

    def drop_points(self, info: ModelInfo, n_tokens: int) -> list[DropPoint]:
        return self.sample_drop_points(info, [n_tokens])[0]

    def sample_drop_points(self, info: ModelInfo, sizes: list[int]) -> list[list[DropPoint]]:
        if self.plan.k is None:
            self.plan.resolve(info)
        k = self.plan.k
        finals = [self.plan.final(n) for n in sizes]
        out = [[] for _ in sizes]
        context = range(len(sizes) - 1)
        if sum(finals[i] for i in context) < sum(sizes[i] for i in context):
            for i in context:
                out[i] = [DropPoint(k + 1, finals[i])]
        if sizes and finals[-1] < sizes[-1]:
            out[-1] = [DropPoint(k + 2, finals[-1])]
        return out

    def reduce_sample(self, sample: SampleTokens) -> list[Reduction]:
        images = sample.images
        everything = [Reduction(torch.arange(len(t), device=t.positions.device)) for t in images]
        if sample.dropping[-1]:  # the query's image, after layer K+1
            query = images[-1]
            if len(images) > 1:
                reference = torch.cat([t.hidden for t in images[:-1]]).float().mean(0)
            else:
                reference = sample.instruction_hidden.float().mean(0)
            return everything[:-1] + [Reduction(top_k_sorted(_cosine(query.hidden, reference), query.keep))]
        query = torch.cat([images[-1].hidden, sample.instruction_hidden]).float().mean(0)
        dropping = [i for i, d in enumerate(sample.dropping) if d]
        scores = torch.cat(
            [
                (images[i].attention - images[i].attention_before).clamp_min(0)
                + self.relevance * _cosine(images[i].hidden, query)
                for i in dropping
            ]
        )
        chosen = top_k_sorted(scores, sample.keep)
        start = 0
        for i in dropping:
            n = len(images[i])
            mine = chosen[(chosen >= start) & (chosen < start + n)] - start
            everything[i] = Reduction(mine)
            start += n
        return everything

    def options(self) -> dict:
        return {"keep": self.plan.keep, "layer": self.plan.layer, "relevance": self.relevance, "budget": self.budget}


@register
@dataclass
class CATP(Pipeline):
    """CATP as one pruner: ``CATPSelect`` before the language model, ``CATPDrop`` inside it.

    ``keep``: visual tokens per image after the last drop (an int; on the demonstrations, their mean,
    as the ranking shares it), or the fraction of each image's tokens (a float; default 64), the
    paper's budget 1 - R. Each image enters the language model with halfway between all its tokens
    and ``keep``. ``layer``: K, the decoder layer after which the demonstrations are pruned (the query
    after K+1); default 6/32 of the depth (6 on 32-layer decoders, as the paper's 7B models).
    ``align`` (lambda_1 = 0.7) weighs the first stage's alignment with each image's text, ``relevance``
    (lambda_2 = 0.6) the demonstrations' likeness to the query. A video is one image, of all its frames'
    tokens (``budget="per_video"``, the only one).
    """

    keep: int | float = 64
    layer: int | None = None
    align: float = 0.7
    relevance: float = 0.6
    budget: str = field(default="per_video", kw_only=True)
    pruners: list = field(init=False, default_factory=list)

    name: ClassVar[str] = "catp"
    stage: ClassVar[str] = "vision+llm"

    def __post_init__(self) -> None:
        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int)):
            raise ValueError(f"layer must be an int (a decoder layer index, K) or None, got {self.layer!r}")
        select = CATPSelect(keep=self.keep, align=self.align, budget=self.budget)  # checks keep
        select.plan = plan = CATPPlan(select.keep, self.layer)
        drop = CATPDrop(keep=select.keep, relevance=self.relevance, budget=self.budget, plan=plan)
        self.pruners = [select, drop]
        super().__post_init__()

    def options(self) -> dict:
        return {
            "keep": self.keep,
            "layer": self.layer,
            "align": self.align,
            "relevance": self.relevance,
            "budget": self.budget,
        }
