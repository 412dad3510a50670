"""The pruners: one file each, each a small dataclass with a ``score`` (a ranking) or a ``select``."""

from vtprune.pruners.adaptive import AdaptivePrune
from vtprune.pruners.aim import AIM, AIMMerge, AIMPrune
from vtprune.pruners.base import DecodePruner, LLMPruner, Pruner, ScheduledPruner, TowerPruner, VisionPruner
from vtprune.pruners.catp import CATP, CATPDrop, CATPSelect
from vtprune.pruners.cdpruner import CDPruner
from vtprune.pruners.cls import CLSPrune
from vtprune.pruners.divprune import DivPrune
from vtprune.pruners.fastv import FastV
from vtprune.pruners.mustdrop import MustDrop, MustDropFilter
from vtprune.pruners.mustdrop_cache import MustDropCache
from vtprune.pruners.mustdrop_merge import MustDropMerge
from vtprune.pruners.pdrop import PyramidDrop
from vtprune.pruners.pitome import PiToMe
from vtprune.pruners.random import RandomPrune
from vtprune.pruners.sparsevlm import SparseVLM
from vtprune.pruners.todre import ToDRE
from vtprune.pruners.tome import ToMe
from vtprune.pruners.transprune import TransPrune
from vtprune.pruners.uniform import UniformPrune
from vtprune.pruners.vflowopt import VFlowOpt, VFlowOptSettings
from vtprune.pruners.visionzip import VisionZip
from vtprune.pruners.zerotprune import ZeroTPrune

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
    "Pruner",
    "PyramidDrop",
    "RandomPrune",
    "ScheduledPruner",
    "SparseVLM",
    "ToDRE",
    "PiToMe",
    "ToMe",
    "TowerPruner",
    "TransPrune",
    "UniformPrune",
    "VFlowOpt",
    "VFlowOptSettings",
    "VisionPruner",
    "VisionZip",
    "ZeroTPrune",
]
