"""The pruners: one file each, each a small dataclass with a ``select``."""

from vtprune.pruners.base import LLMPruner, Pruner, VisionPruner
from vtprune.pruners.cls import CLSPrune
from vtprune.pruners.divprune import DivPrune
from vtprune.pruners.fastv import FastV
from vtprune.pruners.random import RandomPrune
from vtprune.pruners.uniform import UniformPrune

__all__ = ["CLSPrune", "DivPrune", "FastV", "LLMPruner", "Pruner", "RandomPrune", "UniformPrune", "VisionPruner"]
