"""The logits processor with which the lmms-eval model makes ``generate()`` emit given tokens."""

from __future__ import annotations


class ForcedTokens:
    """A logits processor that makes ``generate()`` emit each row's given tokens, one per step (rows
    with fewer tokens are left free after theirs); ``steps``: one more than the longest row, so the
    distribution after each row's last forced token is computed too."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows
        self.steps = max(len(r) for r in rows) + 1
        self.step = 0

    def __call__(self, input_ids, scores):
        forced = scores
        for b, row in enumerate(self.rows):
            if self.step < len(row):
                if forced is scores:
                    forced = scores.clone()
                forced[b] = float("-inf")
                forced[b, row[self.step]] = 0.0
        self.step += 1
        return forced
