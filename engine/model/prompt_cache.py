"""Prompt cache: model cache states (KV and linear-attention) keyed by the tokens they hold.

A new turn reuses the entry with the longest usable common token prefix. Trimmable caches
(mlx-lm's KVCache) can be cut back to any prefix; caches with linear-attention state
(ArraysCache, in qwen3_next / qwen3_5) cannot, so they are only reused when the entry's tokens
are a whole prefix of the new prompt; the service stores snapshots of those at turn boundaries.
The cache is bounded in bytes (the arrays' nbytes) and evicts the least recently used entry.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from engine.errors import RequestError


@dataclass
class CacheHit:
    """A cache state the caller now owns, holding the first `reused` tokens of the prompt."""

    cache: list[Any]
    reused: int


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    cache: list[Any]
    nbytes: int
    trimmable: bool
    used_at: float = field(default_factory=time.monotonic)


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes held by a model cache (sum of its arrays' nbytes)."""
    return sum(int(c.nbytes) for c in cache)


def cache_is_trimmable(cache: Sequence[Any]) -> bool:
    """Whether every layer's cache can be cut back to a shorter prefix."""
    return all(c.is_trimmable() for c in cache)


def cache_length(cache: Sequence[Any]) -> int | None:
    """Tokens a cache holds, read from its attention layers' offsets (None if none report it)."""
    offsets = [o for c in cache for o in _offsets(c)]
    if not offsets or min(offsets) != max(offsets):
        return None
    return offsets[0]


def _offsets(c: Any) -> list[int]:
    if hasattr(c, "caches"):  # mlx-lm CacheList
        return [o for inner in c.caches for o in _offsets(inner)]
    offset = getattr(c, "offset", None)
    return [int(offset)] if isinstance(offset, int) else []


def snapshot(cache: Sequence[Any]) -> list[Any]:
    """Return an independent copy of a cache state (arrays copied)."""
    return copy.deepcopy(list(cache))


def trim_cache(cache: Sequence[Any], n: int) -> None:
    """Drop the last n tokens from a trimmable cache, in place."""
    if n <= 0:
        return
    before = cache_length(cache)
    for c in cache:
        c.trim(n)
    after = cache_length(cache)
    if before is not None and after != before - n:
        raise RequestError(f"cache could not drop {n} tokens (held {before}, now {after})")


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    a, b = tuple(a), tuple(b)
    n = min(len(a), len(b))
    i, step = 0, 1024
    while i + step <= n and a[i : i + step] == b[i : i + step]:  # whole blocks first
        i += step
    while i < n and a[i] == b[i]:
        i += 1
    return i


class PromptCache:
    """Cache states of earlier turns, bounded in bytes, looked up by longest common prefix."""

    def __init__(self, max_bytes: int, max_entries: int = 8) -> None:
        if max_bytes < 0 or max_entries < 1:
            raise ValueError(f"max_bytes must be >= 0 and max_entries >= 1, got {max_bytes}, {max_entries}")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries: list[_Entry] = []

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """Bytes held by all entries."""
        return sum(e.nbytes for e in self._entries)

    def clear(self) -> None:
        """Drop every entry."""
        self._entries.clear()

    def fetch(self, tokens: Sequence[int]) -> CacheHit | None:
        """Return a cache state serving the longest prefix of `tokens` (at most len-1), or None.

        A trimmable entry is taken out (its longer state is rebuilt by storing the new turn);
        a non-trimmable one is copied and stays, since a shorter state cannot be made from a
        longer one (a regenerated answer needs the same snapshot again).
        """
        best: tuple[int, _Entry] | None = None
        for entry in self._entries:
            usable = self._usable(entry, tokens)
            if usable > 0 and (best is None or usable > best[0]):
                best = (usable, entry)
        if best is None:
            return None
        usable, entry = best
        if not entry.trimmable:
            entry.used_at = time.monotonic()
            return CacheHit(cache=snapshot(entry.cache), reused=usable)
        self._entries.remove(entry)
        trim_cache(entry.cache, len(entry.tokens) - usable)
        return CacheHit(cache=entry.cache, reused=usable)

    def store(self, tokens: Sequence[int], cache: list[Any]) -> bool:
        """Keep `cache` (which must hold exactly `tokens`); the cache takes ownership. False if too big."""
        key = tuple(tokens)
        if not key:
            return False
        length = cache_length(cache)
        if length is not None and length != len(key):
            raise RequestError(f"cache holds {length} tokens but {len(key)} were given to store")
        entry = _Entry(key, cache, cache_nbytes(cache), cache_is_trimmable(cache))
        if entry.nbytes > self.max_bytes:
            return False
        # An equal key is replaced; a trimmable entry also serves every prefix of itself.
        self._entries = [
            e
            for e in self._entries
            if e.tokens != key and not (entry.trimmable and e.trimmable and key[: len(e.tokens)] == e.tokens)
        ]
        self._entries.append(entry)
        self._evict()
        return True

    def _usable(self, entry: _Entry, tokens: Sequence[int]) -> int:
        common = common_prefix_len(entry.tokens, tokens)
        limit = len(tokens) - 1  # at least one token must be prefilled to get logits
        if common == len(entry.tokens) and common <= limit:
            return common
        return min(common, limit) if entry.trimmable else 0

    def _evict(self) -> None:
        self._entries.sort(key=lambda e: e.used_at)
        while self._entries and (self.nbytes > self.max_bytes or len(self._entries) > self.max_entries):
            self._entries.pop(0)
