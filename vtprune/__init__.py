"""vtprune: training-free visual-token pruning for LLaVA models in Hugging Face transformers.

import vtprune
handle = vtprune.apply(model, "divprune", keep=64)
model.generate(**inputs)
handle.remove()
"""

from vtprune.api import apply, handle_of
from vtprune.core.stats import PruneStats
from vtprune.handle import PruneHandle
from vtprune.patches import supported_classes
from vtprune.pruners import (
    AIM,
    CATP,
    AdaptivePrune,
    AIMMerge,
    AIMPrune,
    CATPDrop,
    CATPSelect,
    CDPruner,
    CLSPrune,
    DecodePruner,
    DivPrune,
    FastV,
    LLMPruner,
    MustDrop,
    MustDropCache,
    MustDropFilter,
    MustDropMerge,
    PiToMe,
    Pruner,
    PyramidDrop,
    RandomPrune,
    ScheduledPruner,
    SparseVLM,
    ToDRE,
    ToMe,
    TowerPruner,
    TransPrune,
    UniformPrune,
    VFlowOpt,
    VFlowOptSettings,
    VisionPruner,
    VisionZip,
    ZeroTPrune,
)
from vtprune.pruners.pipeline import Pipeline
from vtprune.registry import available

__version__ = "0.1.0"

__all__ = [
    "AIM",
    "AIMMerge",
    "AIMPrune",
    "AdaptivePrune",
    "CATP",
    "CATPDrop",
    "CATPSelect",
    "CDPruner",
    "CLSPrune",
    "DecodePruner",
    "DivPrune",
    "FastV",
    "LLMPruner",
    "MustDrop",
    "MustDropCache",
    "MustDropFilter",
    "MustDropMerge",
    "PiToMe",
    "Pipeline",
    "PruneHandle",
    "PruneStats",
    "Pruner",
    "PyramidDrop",
    "RandomPrune",
    "ScheduledPruner",
    "SparseVLM",
    "ToDRE",
    "ToMe",
    "TowerPruner",
    "TransPrune",
    "UniformPrune",
    "VFlowOpt",
    "VFlowOptSettings",
    "VisionPruner",
    "VisionZip",
    "ZeroTPrune",
    "apply",
    "available",
    "handle_of",
    "supported_classes",
]
