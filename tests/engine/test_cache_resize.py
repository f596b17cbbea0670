"""Giving the expert cache's memory back: pools rebuilt smaller (and larger), tokens still mlx-lm's.

A shrink must really release memory (the pools' bytes and MLX's active memory fall), keep the K
working slots of each bank at the floor, and leave generation exact; a grow copies the resident
experts into the larger pools (no re-reads) and is exact too.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import pytest

from engine.engine import Engine
from engine.types import EngineOptions, SamplingParams
from exactness import GENERATED_TOKENS, PREFILL_CHUNK, cache_mb, long_prompt, mlx_lm_reference, share_tokenizers

_reference_cache: dict[Path, list[int]] = {}


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    share_tokenizers(monkeypatch)


def _reference(path: Path) -> list[int]:
    if path not in _reference_cache:
        _reference_cache[path] = mlx_lm_reference(path, long_prompt())
    return _reference_cache[path]


def _tokens(engine: Engine) -> list[int]:
    return [ev.token for ev in engine.generate(long_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS))]


@pytest.mark.parametrize("size", ["partial", "all"])
def test_shrink_releases_memory_and_grow_restores_it_with_exact_tokens(tiny_model, size: str) -> None:
    path = tiny_model("qwen3_moe", 4)
    expected = _reference(path)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, size), prefill_chunk=PREFILL_CHUNK), measure_disk=False)
    try:
        streamer = engine._loaded.streamer
        assert _tokens(engine) == expected
        full = streamer.resident_bytes
        hits_before = streamer.hits
        mx.eval(*[c.pool.arrays[k] for c in streamer.caches for k in c.pool.arrays])
        active_before = mx.get_active_memory()

        shrunk = engine.resize_expert_cache("shrink")
        assert shrunk is not None and shrunk.old_bytes == full and shrunk.level == 1
        assert streamer.resident_bytes == shrunk.new_bytes < full
        # the pools' bytes really left MLX (the old arrays were dropped, not just emptied)
        assert active_before - mx.get_active_memory() >= (full - shrunk.new_bytes) * 0.9
        assert engine.expert_counters()["expert_cache_full_bytes"] == full
        assert streamer.hits >= hits_before  # counters are since load, across rebuilt pools
        assert _tokens(engine) == expected

        grown = engine.resize_expert_cache("grow")
        assert grown is not None and grown.level == 0 and streamer.resident_bytes == full
        assert grown.kept_experts > 0  # the resident experts came along: no re-read for them
        read_before = engine.expert_counters()["bytes_read"]
        assert _tokens(engine) == expected
        if size == "all":  # every expert fits: what the grow kept is not read again
            assert engine.expert_counters()["bytes_read"] - read_before < full
        assert engine.resize_expert_cache("grow") is None  # at the budget's size already
    finally:
        engine.close()


def test_shrinking_stops_at_the_working_slots_and_stays_exact(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "all"), prefill_chunk=PREFILL_CHUNK), measure_disk=False)
    try:
        streamer = engine._loaded.streamer
        steps = 0
        while engine.resize_expert_cache("shrink") is not None:
            steps += 1
            assert steps < 64
        assert steps >= 2
        working = engine.experts_per_token
        assert all(c.pool.n_slots == working for c in streamer.caches)
        assert _tokens(engine) == _reference(path)
        with pytest.raises(ValueError, match="direction must be 'shrink' or 'grow', got 'halve'"):
            engine.resize_expert_cache("halve")
    finally:
        engine.close()
