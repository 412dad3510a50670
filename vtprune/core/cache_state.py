"""Per-KV-cache memory of how a pruned prefill reshaped the sequence, for the decode steps after it."""

from __future__ import annotations


class CacheState:
    """Maps a cache object to what its prefill pruned; the entry lives on the cache, and dies with it.

    Stored as an attribute of the cache rather than in a ``WeakKeyDictionary``: torch.compile cannot
    build guards over a weak dictionary, and a copied cache (``copy.deepcopy``) keeps its meaning.
    """

    def __init__(self, key: str):
        self.attr = f"_vtprune_{key}"

    def get(self, cache):
        return None if cache is None else getattr(cache, self.attr, None)

    def __setitem__(self, cache, value) -> None:
        setattr(cache, self.attr, value)
