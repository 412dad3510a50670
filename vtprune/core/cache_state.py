"""Per-KV-cache memory of how a pruned prefill reshaped the sequence, for the decode steps after it."""

from __future__ import annotations

import weakref


class CacheState:
    """Maps a cache object to what its prefill pruned; entries die with their cache."""

    def __init__(self):
        self._by_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def get(self, cache):
        return None if cache is None else self._by_cache.get(cache)

    def __setitem__(self, cache, value) -> None:
        self._by_cache[cache] = value
