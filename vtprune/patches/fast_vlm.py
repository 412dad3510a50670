"""FastVLM (``FastVlmForConditionalGeneration``; a LLaVA-style model on a timm FastViT-HD tower).

One image per ``<image>``: FastViT-HD downsamples it 64 times (1024 px: a 16 x 16 grid) and every
cell of that grid is one visual token, in raster order, all prunable. The tower has no CLS token, so
pruners that read the CLS attention get, as on SigLIP towers, the attention each token receives in
the tower's last attention stage (averaged over heads and queries), and the keys of that stage. The
last stage's blocks are the tower layers pruners name (``timm_towers.py``); tower-stage pruners are
refused (convolutions mix every patch with its neighbours after each attention block).
"""

from __future__ import annotations

from vtprune.core.image_parts import ImageParts
from vtprune.core.tower_signals import TowerSignals
from vtprune.patches.adapter import Adapter

_DOWNSAMPLING = 64  # FastViT-HD: a 4x stem, then four stages that each halve the grid


class FastVlmAdapter(Adapter):
    supported = ("FastVlmForConditionalGeneration",)

    def image_parts(self, features: list, arguments: dict, signals: TowerSignals | None) -> list[ImageParts]:
        height, width = arguments["pixel_values"].shape[-2:]
        grid = (-(-height // _DOWNSAMPLING), -(-width // _DOWNSAMPLING))  # each stride-2 step rounds up
        out = []
        for i, f in enumerate(features):
            scores = keys = None
            if signals is not None:
                scores, keys = signals.split(signals.values[i])
            out.append(ImageParts.single(f.shape[0], grid, scores, keys))
        return out
