"""Scoring math shared by the pruners: plain tensor functions, no model classes.

Each scoring op takes ``backend="auto" | "torch" | "triton"``. ``torch`` is the readable reference and
the oracle in the tests; ``triton`` runs fused kernels (CUDA, or Triton's CPU interpreter under
``TRITON_INTERPRET=1``); ``auto`` picks Triton for CUDA tensors when it is installed. Triton is
imported only when a kernel first runs. The merging helpers (VisionZip's; ToMe's bipartite matching and
MustDrop's window merge, for the tower stage), CATP's greedy facility location and CDPruner's DPP
selection are plain torch.
"""

from vtprune.ops._backend import BACKENDS, check_backend, resolve_backend, triton_available
from vtprune.ops.attention import attention_rows
from vtprune.ops.bipartite import (
    Matching,
    bipartite_matching,
    max_merges,
    merge_origin,
    merge_weighted,
    proportional_bias,
    spread_merges,
    unmerge,
)
from vtprune.ops.clustering import density_peak_clusters
from vtprune.ops.diversity import max_min_diversity
from vtprune.ops.dpp import conditional_dpp, instruction_relevance
from vtprune.ops.entropy import patch_entropy
from vtprune.ops.facility import facility_location, rescaled_cosine
from vtprune.ops.k_center import k_center
from vtprune.ops.merging import nearest_targets, strided_targets
from vtprune.ops.pagerank import attention_rank, causal_attention_rank, importance_guided_drops
from vtprune.ops.sinks import global_token_attention
from vtprune.ops.spatial import farthest_points
from vtprune.ops.spread import mass_spread
from vtprune.ops.transition import transition_variation
from vtprune.ops.windows import window_matching, window_scores

__all__ = [
    "BACKENDS",
    "Matching",
    "attention_rank",
    "attention_rows",
    "bipartite_matching",
    "causal_attention_rank",
    "check_backend",
    "conditional_dpp",
    "density_peak_clusters",
    "facility_location",
    "farthest_points",
    "global_token_attention",
    "importance_guided_drops",
    "instruction_relevance",
    "k_center",
    "max_merges",
    "mass_spread",
    "max_min_diversity",
    "merge_origin",
    "merge_weighted",
    "nearest_targets",
    "patch_entropy",
    "proportional_bias",
    "rescaled_cosine",
    "resolve_backend",
    "spread_merges",
    "strided_targets",
    "transition_variation",
    "triton_available",
    "unmerge",
    "window_matching",
    "window_scores",
]
