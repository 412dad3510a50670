"""Scoring math shared by the pruners: plain tensor functions, no model classes.

Each op takes ``backend="auto" | "torch"``; ``torch`` is the readable reference.
"""

from vtprune.ops.attention import attention_rows
from vtprune.ops.diversity import max_min_diversity

__all__ = ["attention_rows", "max_min_diversity"]
