"""What every vLLM model family pruned by vtprune shares: the pruner its config asks for, checked
against the model at engine start, and the image pruning built on its tower."""

from __future__ import annotations

from torch import nn

from vtprune.core.tokens import ModelInfo
from vtprune.patches.adapter import selected_layers
from vtprune.serving.images import ImagePruning, placeholder_count
from vtprune.serving.options import check_against, serving_pruner
from vtprune.serving.towers import built_layers, vllm_tower_spec


def model_info(
    hf_config, tower: nn.Module, visual_tokens: int | None, tower_layers: tuple[int, tuple[int, ...]] | None = None
) -> ModelInfo:
    """What a pruner may know of a vLLM model (as ``Adapter.info`` for transformers'). ``tower_layers``:
    (the tower's layers, the ones whose output the model reads), where not LLaVA's config fields."""
    spec = vllm_tower_spec(tower)
    if tower_layers is None:
        n_tower = hf_config.vision_config.num_hidden_layers
        tower_layers = (n_tower, selected_layers(hf_config.vision_feature_layer, n_tower))
    n_tower, feature_layers = tower_layers
    return ModelInfo(
        num_decoder_layers=hf_config.text_config.num_hidden_layers,
        num_tower_layers=n_tower,
        tower_has_cls=spec is not None and spec.has_cls,
        tower_name=f"{type(tower).__name__} (vLLM)",
        feature_layers=feature_layers,
        visual_tokens=visual_tokens,
    )


def image_pruning(
    hf_config, tower: nn.Module, visual_tokens: int | None, tower_layers: tuple[int, tuple[int, ...]] | None = None
) -> ImagePruning | None:
    """The pruning ``hf_config.vtprune`` asks for on this model (None: off), every check done first:
    at engine start, an invalid option or a pruner this model cannot run raises vtprune's message."""
    pruner = serving_pruner(hf_config)
    if pruner is None:
        return None
    info = model_info(hf_config, tower, visual_tokens, tower_layers)
    spec = vllm_tower_spec(tower)
    if pruner.reads_tower(info) and spec is None:
        raise ValueError(f"the {pruner.name!r} pruner cannot read attention from vision tower {info.tower_name}")
    check_against(pruner, info, built_layers(tower))
    return ImagePruning(pruner, tower, spec, info)


def image_placeholders(hf_config, tokens: int) -> int:
    """Placeholders of an image of ``tokens`` tokens, all prunable, under the pruning ``hf_config.vtprune``
    asks for (``tokens`` when off)."""
    pruner = serving_pruner(hf_config)
    return tokens if pruner is None else placeholder_count(pruner, tokens)
