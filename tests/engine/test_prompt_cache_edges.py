"""Prompt-cache edges (engine/model/prompt_cache.py): nested cache lists are measured through, a
cache that will not drop tokens is an error naming the counts (never a silently longer context),
and an empty prompt is never stored."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import CacheList, KVCache

from engine.errors import RequestError
from engine.model.prompt_cache import PromptCache, cache_length, trim_cache


def kv(n: int) -> KVCache:
    c = KVCache()
    x = mx.zeros((1, 2, n, 4))
    c.update_and_fetch(x, x)
    return c


def test_cache_lists_are_measured_through() -> None:
    assert cache_length([CacheList(kv(5), kv(5)), kv(5)]) == 5
    assert cache_length([CacheList(kv(5), kv(4))]) is None  # disagreeing layers: no length


class Stuck:
    """A layer cache whose trim drops nothing (as a cache with a fixed window would)."""

    def __init__(self, n: int) -> None:
        self.offset = n

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        return 0


def test_a_cache_that_does_not_drop_the_tokens_is_an_error_naming_the_counts() -> None:
    cache: list[Any] = [Stuck(10)]
    with pytest.raises(RequestError, match=r"cache could not drop 3 tokens \(held 10, now 10\)"):
        trim_cache(cache, 3)
    trim_cache(cache, 0)  # nothing to drop: nothing asked of the cache


def test_an_empty_prompt_is_never_stored() -> None:
    pc = PromptCache(max_bytes=1 << 20)
    assert pc.store([], [kv(0)]) is False
    assert len(pc) == 0 and pc.fetch([1, 2, 3]) is None
