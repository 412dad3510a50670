"""What the lmms-eval model reports per sample, in lmms-eval's own token-count record."""

from __future__ import annotations

from dataclasses import dataclass

from lmms_eval.api.instance import TokenCounts


@dataclass
class PrunedTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what pruning did to the sample.

    visual_tokens: the sample's visual tokens before pruning.
    kept_visual_tokens: those reaching the last decoder layer (merged tokens count as one each).
    mean_layer_visual_tokens: the mean over decoder layers of the visual tokens entering each (what
        prefill compute scales with): kept_visual_tokens for vision-stage pruners, more for pruners
        that drop inside the LLM.
    prefill_ms: from the start of the call to the end of the first forward (vision tower and LLM
        prefill), for the whole batch the sample ran in.
    batch_size: how many samples shared that forward.
    """

    visual_tokens: int | None = None
    kept_visual_tokens: int | None = None
    mean_layer_visual_tokens: float | None = None
    prefill_ms: float | None = None
    batch_size: int | None = None

    def to_dict(self) -> dict:
        out = super().to_dict()
        for name in ("visual_tokens", "kept_visual_tokens", "mean_layer_visual_tokens", "prefill_ms", "batch_size"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out
