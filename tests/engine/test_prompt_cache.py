"""Prompt cache: longest-prefix reuse, trimming, non-trimmable (linear-attention) states, byte bound."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache

from engine.errors import RequestError
from engine.model.prompt_cache import (
    PromptCache,
    cache_is_trimmable,
    cache_length,
    cache_nbytes,
    common_prefix_len,
    snapshot,
)


def kv_layer(n: int, fill: float = 1.0) -> KVCache:
    c = KVCache()
    if n:
        x = mx.full((1, 2, n, 4), fill)
        c.update_and_fetch(x, x)
    return c


def linear_layer(value: float) -> ArraysCache:
    c = ArraysCache(size=2)
    c[0] = mx.full((1, 3), value)
    c[1] = mx.full((1, 2, 2), value)
    return c


def kv_cache(n: int, layers: int = 2) -> list:
    return [kv_layer(n) for _ in range(layers)]


def mixed_cache(n: int) -> list:
    return [linear_layer(float(n)), kv_layer(n)]


@pytest.mark.parametrize(
    ("a", "b", "n"),
    [
        ([], [1], 0),
        ([1, 2, 3], [1, 2, 3], 3),
        ([1, 2, 3], [1, 2], 2),
        ([1, 2, 3], [1, 9, 3], 1),
        (list(range(5000)), list(range(5000)), 5000),
        (list(range(5000)), list(range(3000)) + [-1] + list(range(3001, 5000)), 3000),
        (list(range(2048)), list(range(2049)), 2048),
        (tuple(range(1030)), list(range(1023)) + [0], 1023),
    ],
)
def test_common_prefix_len(a: list[int], b: list[int], n: int) -> None:
    assert common_prefix_len(a, b) == n
    assert common_prefix_len(b, a) == n


def test_cache_facts() -> None:
    kv = kv_cache(10)
    assert cache_length(kv) == 10 and cache_is_trimmable(kv)
    assert cache_nbytes(kv) == sum(c.keys.nbytes + c.values.nbytes for c in kv) > 0
    mixed = mixed_cache(7)
    assert cache_length(mixed) == 7 and not cache_is_trimmable(mixed)
    assert cache_length([linear_layer(1.0)]) is None


def test_trimmable_entry_serves_a_shared_prefix() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    assert pc.store(list(range(10)), kv_cache(10))
    hit = pc.fetch([0, 1, 2, 3, 4, 99, 100])
    assert hit is not None and hit.reused == 5
    assert cache_length(hit.cache) == 5
    assert len(pc) == 0  # taken: the caller owns it and stores the extended state back


def test_same_prompt_leaves_one_token_to_prefill() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    pc.store(list(range(10)), kv_cache(10))
    hit = pc.fetch(list(range(10)))
    assert hit is not None and hit.reused == 9 and cache_length(hit.cache) == 9


def test_no_shared_prefix_is_a_miss() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    pc.store([5, 6, 7], kv_cache(3))
    assert pc.fetch([1, 2, 3]) is None
    assert len(pc) == 1


def test_longest_prefix_wins() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    pc.store([1, 2, 9], kv_cache(3))
    pc.store([1, 2, 3, 4, 8], kv_cache(5))
    hit = pc.fetch([1, 2, 3, 4, 5, 6])
    assert hit is not None and hit.reused == 4


def test_non_trimmable_state_is_reused_only_as_a_whole_prefix() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    pc.store(list(range(10)), mixed_cache(10))
    assert pc.fetch(list(range(9)) + [42, 43]) is None  # would need trimming a linear state
    assert pc.fetch(list(range(10))) is None  # same prompt: would need to drop one token
    hit = pc.fetch(list(range(12)))
    assert hit is not None and hit.reused == 10
    assert float(hit.cache[0][0][0, 0]) == 10.0  # the linear state itself came back
    # it was copied: the entry stays for a regenerated answer, untouched by the caller's changes
    hit.cache[0][0] = mx.zeros((1, 3))
    again = pc.fetch(list(range(11)))
    assert again is not None and again.reused == 10 and float(again.cache[0][0][0, 0]) == 10.0


def test_storing_a_trimmable_extension_drops_its_prefixes() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    pc.store([1, 2, 3], kv_cache(3))
    pc.store([1, 2, 3, 4, 5], kv_cache(5))
    assert len(pc) == 1
    pc.store([1, 2, 3], mixed_cache(3))
    pc.store([1, 2, 3, 4, 5, 6], mixed_cache(6))
    assert len(pc) == 3  # non-trimmable snapshots of prefixes are kept: they cannot be rebuilt by trimming


def test_byte_bound_evicts_least_recently_stored() -> None:
    one = cache_nbytes(kv_cache(3))
    pc = PromptCache(max_bytes=2 * one)
    pc.store([1, 1, 1], kv_cache(3))
    pc.store([2, 2, 2], kv_cache(3))
    pc.store([3, 3, 3], kv_cache(3))
    assert len(pc) == 2 and pc.nbytes <= 2 * one
    assert pc.fetch([1, 1, 1, 0]) is None
    assert pc.fetch([3, 3, 3, 0]) is not None


def test_too_big_entry_is_not_kept() -> None:
    pc = PromptCache(max_bytes=10)
    assert not pc.store([1, 2, 3], kv_cache(3))
    assert len(pc) == 0 and pc.nbytes == 0


def test_zero_bound_keeps_nothing() -> None:
    pc = PromptCache(max_bytes=0)
    for n in (1, 3):
        assert not pc.store(list(range(n)), kv_cache(n))
    assert len(pc) == 0 and pc.nbytes == 0
    assert pc.fetch([0, 1, 2, 3]) is None


def test_entry_count_bound() -> None:
    pc = PromptCache(max_bytes=1 << 30, max_entries=2)
    for i in range(4):
        pc.store([i, i], kv_cache(2))
    assert len(pc) == 2


def test_store_checks_the_token_count() -> None:
    pc = PromptCache(max_bytes=1 << 30)
    with pytest.raises(RequestError, match="holds 3 tokens but 4"):
        pc.store([1, 2, 3, 4], kv_cache(3))


def test_snapshot_is_independent() -> None:
    live = mixed_cache(4)
    snap = snapshot(live)
    live[0][0] = mx.zeros((1, 3))
    live[1].update_and_fetch(mx.zeros((1, 2, 1, 4)), mx.zeros((1, 2, 1, 4)))
    assert float(snap[0][0][0, 0]) == 4.0
    assert cache_length(snap) == 4 and cache_length(live) == 5


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError):
        PromptCache(max_bytes=-1)
