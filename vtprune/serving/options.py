"""What ``hf_overrides={"vtprune": {...}}`` asks vLLM to prune, checked as ``vtprune.apply`` checks it.

The options reach every vLLM process on the model's Hugging Face config (vLLM sets each key of
``hf_overrides`` on it): ``config.vtprune`` is ``{"pruner": name, **options}``. Only pruners that
decide before the language model can run in vLLM: its paged KV cache holds the same tokens in every
decoder layer, and the number of placeholder tokens per image is fixed when the prompt is processed.
"""

from __future__ import annotations

import functools
import json
import logging

from vtprune.api import make_pruner
from vtprune.core.tokens import ModelInfo
from vtprune.pruners.base import VisionPruner
from vtprune.pruners.pipeline import as_pipeline
from vtprune.registry import available

KEY = "vtprune"  # the hf_overrides key (a contract: hf_overrides={"vtprune": {"pruner": ..., ...}})

log = logging.getLogger(__name__)

_NO_LLM_STAGE = (
    "vLLM's paged KV cache holds the same tokens in every decoder layer, so tokens cannot be dropped "
    "inside the language model; use a pruner that decides before it (e.g. divprune, cls, visionzip)"
)
_NOT_HERE = {
    "tower": (
        "it merges or drops tokens inside the vision tower, which vtprune does not patch in vLLM's own tower "
        "implementations; use a pruner that decides after the tower (e.g. divprune, cls, visionzip)"
    ),
    "text": (
        "it reads each image's paired prompt text, which vLLM's image encoder does not see (images are "
        "encoded, and cached, apart from their prompts)"
    ),
    "rule": "it scores the tower's attention by its own rule, which vtprune does not read in vLLM's towers yet",
}


def requested(hf_config) -> dict | None:
    """The options the config carries (a copy), or None when pruning was not asked for."""
    options = getattr(hf_config, KEY, None)
    if options is None:
        return None
    if not isinstance(options, dict):
        raise TypeError(
            f'hf_overrides["{KEY}"] must be a dict such as {{"pruner": "divprune", "keep": 64}}, got {options!r}'
        )
    return dict(options)


def serving_pruner(hf_config) -> VisionPruner | None:
    """The vision-stage pruner ``hf_config.vtprune`` asks for (None: pruning off), with the checks of
    ``vtprune.apply`` on its options and vLLM's own refusals, each a message saying what is allowed."""
    options = requested(hf_config)
    if options is None:
        return None
    try:
        key = json.dumps(options, sort_keys=True)
    except TypeError:  # not JSON-like (an object given in Python): checked without the cache
        return _pruner(options)
    return _cached(key)


@functools.lru_cache(maxsize=16)
def _cached(options: str) -> VisionPruner:
    # The processor asks for every image: the options are checked (and ToDRE's warning given) once.
    return _pruner(json.loads(options))


def _pruner(options: dict) -> VisionPruner:
    name = options.pop("pruner", None)
    if name is None:
        raise ValueError(
            f'hf_overrides["{KEY}"] needs "pruner": one of {", ".join(available())}; got options {sorted(options)}'
        )
    if not isinstance(name, str):
        raise TypeError(f'hf_overrides["{KEY}"]["pruner"] must be a pruner name (a str), got {name!r}')
    pipeline = as_pipeline(make_pruner(name, **options))
    why = _refusal(pipeline)
    if why:
        raise ValueError(f"the {name!r} pruner cannot run in vLLM: {why}")
    if pipeline.llm:
        log.warning(
            "vtprune: %r runs its vision stage only in vLLM (%s); its late-layer gate is not applied",
            name,
            _NO_LLM_STAGE.split(";")[0],
        )
    return pipeline.vision


def _refusal(pipeline) -> str:
    vision = pipeline.vision
    if pipeline.tower is not None:
        return _NOT_HERE["tower"]
    if pipeline.decode is not None or (pipeline.llm and not type(pipeline).late_gate):
        return _NO_LLM_STAGE
    if vision is None:
        return _NO_LLM_STAGE
    if vision.reads_text:
        return _NOT_HERE["text"]
    if vision.tower_score_rule() is not None:
        return _NOT_HERE["rule"]
    return ""


def check_against(pruner: VisionPruner, info: ModelInfo, built_tower_layers: int) -> None:
    """``vtprune.apply``'s check of the pruner against the model, and that the tower layers it reads
    exist in vLLM's tower, which is built only up to the layer whose output the model selects."""
    pruner.check(info)
    read = sorted(set(pruner.tower_attention_layers(info)) | set(pruner.tower_key_layers(info)))
    beyond = [i for i in read if i >= built_tower_layers]
    if beyond:
        raise ValueError(
            f"the {pruner.name!r} pruner reads vision-tower layers {beyond}, but vLLM builds this model's tower only "
            f"up to layer {built_tower_layers - 1} (the one whose output the model selects); use layers up to it"
        )
