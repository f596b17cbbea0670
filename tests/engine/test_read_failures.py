"""Expert reads that fail: during preload, during a prefetch, and for an expert a layer needs.

A failed read must never leave a slot that claims an expert it does not hold: preload and needed
reads raise the read's error (naming the file) with the key forgotten, and the next request reads
it again; a failed prefetch is a guess that costs nothing, and the answer stays exact.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import pytest

from engine.engine import Engine
from engine.errors import ExpertReadError
from engine.types import EngineOptions, SamplingParams
from exactness import cache_mb, long_prompt, long_prompt_reference, share_tokenizers

N_TOKENS = 16


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    share_tokenizers(monkeypatch)


def _failing_submit(engine: Engine, fails: Callable[[int, int], bool]) -> list[tuple[int, int]]:
    """Make the store's reads of (layer, expert) where ``fails`` says so raise; returns the log."""
    store = engine._loaded.store
    real = store.submit
    failed: list[tuple[int, int]] = []

    def submit(layer: int, expert: int, dests: Any) -> "Future[int]":
        if fails(layer, expert):
            failed.append((layer, expert))
            future: Future[int] = Future()
            future.set_exception(ExpertReadError(f"layer {layer} expert {expert}: simulated read failure (EIO)"))
            return future
        return real(layer, expert, dests)

    store.submit = submit  # type: ignore[method-assign]
    return failed


def _tokens(engine: Engine) -> list[int]:
    return [ev.token for ev in engine.generate(long_prompt(), SamplingParams(max_tokens=N_TOKENS))]


def test_read_failure_during_preload_is_raised_and_the_expert_read_again_later(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "all")), measure_disk=False)
    try:
        streamer = engine._loaded.streamer
        store = engine._loaded.store
        real_submit = store.submit
        failed = _failing_submit(engine, lambda layer, expert: (layer, expert) == (1, 3))
        with pytest.raises(ExpertReadError, match="layer 1 expert 3"):
            engine.preload_experts()
        assert failed == [(1, 3)]
        cache = streamer.cache_of_layer[1]
        assert (1, 3) not in cache and (1, 2) in cache and (2, 3) in streamer.cache_of_layer[2]
        assert streamer.device_table(1) is None  # layer 1 is not whole: no device routing for it
        store.submit = real_submit  # type: ignore[method-assign]
        one_expert = streamer.layers[1].expert_bytes
        assert engine.preload_experts() == one_expert  # only the missing one is read
        assert _tokens(engine) == long_prompt_reference(path, N_TOKENS)
    finally:
        engine.close()


def test_read_failure_of_a_needed_expert_fails_the_request_and_the_next_one_is_exact(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "partial")), measure_disk=False)
    try:
        store = engine._loaded.store
        real_submit = store.submit
        failed = _failing_submit(engine, lambda layer, expert: layer == 2)
        with pytest.raises(ExpertReadError, match="layer 2 expert"):
            _tokens(engine)
        assert failed and all(layer == 2 for layer, _ in failed)
        assert not any(key[0] == 2 for c in engine._loaded.streamer.caches for key in c.resident())
        store.submit = real_submit  # type: ignore[method-assign]
        assert _tokens(engine) == long_prompt_reference(path, N_TOKENS)
    finally:
        engine.close()


def test_failed_prefetch_reads_cost_nothing(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "partial"), prefetch=True), measure_disk=False)
    try:
        streamer = engine._loaded.streamer
        prefetching = [False]
        real_prefetch = streamer.prefetch_experts

        def prefetch(layer: int, experts: Any) -> None:
            prefetching[0] = True
            try:
                real_prefetch(layer, experts)
            finally:
                prefetching[0] = False

        streamer.prefetch_experts = prefetch  # type: ignore[method-assign]
        failed = _failing_submit(engine, lambda layer, expert: prefetching[0])
        assert _tokens(engine) == long_prompt_reference(path, N_TOKENS)
        assert failed  # predictions were made, and every one of their reads failed
        assert engine.expert_counters()["prefetched_hits"] == 0
    finally:
        engine.close()
