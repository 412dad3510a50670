"""Two small hooks the lmms-eval model puts around ``generate()``: a timer of the first forward
(the prefill) and a logits processor that makes ``generate()`` emit given tokens."""

from __future__ import annotations

import time

import torch


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


class FirstForwardTimer:
    """Seconds from ``start()`` to the end of the model's first forward after it."""

    def __init__(self, model, device):
        self._device = torch.device(device)
        self._handle = model.register_forward_hook(self._done)
        self._start = None
        self.seconds = None

    def _sync(self):
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)

    def start(self):
        self._sync()
        self.seconds, self._start = None, time.perf_counter()

    def _done(self, *_):
        if self.seconds is None and self._start is not None:
            self._sync()
            self.seconds = time.perf_counter() - self._start

    def close(self):
        self._handle.remove()
