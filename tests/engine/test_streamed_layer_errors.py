"""Error paths of the streamed layer (engine/model/streamed_moe.py, expert_cache.py) a user meets.

- a corrupt expert of the packed layout fails every request that needs it, naming the file, the
  layer and the expert (never served silently), and once repaired the answer is mlx-lm's;
- a MoE block that passes bank arguments cannot be split into expert groups: refused, naming the
  layer and the cache size that would work, with nothing read;
- a pool whose every slot is pinned refuses a placement, naming its size and the key;
- a prefetch never takes a slot the warm start is filling;
- a request that needs an expert the warm start is still reading waits for that read (one read,
  not two), and a failed warm-start read is read again by the request: the answer stays exact;
- prefetching into a pool that holds every expert (the device-routed path) stays exact;
- a platform whose MLX arrays do not share memory with NumPy is refused at load.
"""

from __future__ import annotations

import shutil
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import mlx.core as mx
import numpy as np
import pytest

import engine.model.expert_cache as expert_cache
from engine.engine import Engine
from engine.errors import ExpertReadError, UnsupportedModelError
from engine.model.expert_cache import ExpertCache, SlotPool
from engine.model.streamed_moe import ExpertStreamer
from engine.storage.expert_layout import ExpertParam, LayerExperts
from engine.storage.pack import pack_model
from engine.storage.packed_layout import open_packed_layout
from engine.types import EngineOptions, SamplingParams
from exactness import cache_mb, long_prompt, long_prompt_reference, share_tokenizers

N_TOKENS = 16


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    share_tokenizers(monkeypatch)


def _tokens(engine: Engine) -> list[int]:
    return [ev.token for ev in engine.generate(long_prompt(), SamplingParams(max_tokens=N_TOKENS))]


def _flip_byte(file: Path, offset: int) -> None:
    with open(file, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_corrupt_packed_expert_fails_every_request_that_needs_it_until_repaired(tiny_model, tmp_path: Path) -> None:
    src = tiny_model("qwen3_moe", 4)
    engine = Engine.load(src, EngineOptions(cache_mb=0), measure_disk=False)
    try:  # an expert of layer 1 that the long prompt routes to
        touched: set[tuple[int, int]] = set()
        engine._loaded.streamer.touched = touched
        assert _tokens(engine) == long_prompt_reference(src, N_TOKENS)
        expert = min(e for (layer, e) in touched if layer == 1)
    finally:
        engine.close()
    path = tmp_path / "model"
    shutil.copytree(src, path)
    pack_model(path, io_threads=2)
    packed = open_packed_layout(path, engine._loaded.layers)
    assert packed is not None
    victim = packed[1]
    where = victim.blob_offset(expert) + engine._loaded.layers[1].expert_bytes // 2
    _flip_byte(victim.file, where)  # corrupt on disk before the engine starts
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        assert engine.plan.layout == "packed"
        for _ in range(2):  # each request fails: the corrupt expert is never served from a slot
            with pytest.raises(ExpertReadError) as failed:
                _tokens(engine)
            message = str(failed.value)
            assert str(victim.file) in message and f"layer 1 expert {expert}" in message and "corrupt" in message
            assert all((1, expert) not in c for c in engine._loaded.streamer.caches)
        _flip_byte(victim.file, where)  # repaired
        assert _tokens(engine) == long_prompt_reference(src, N_TOKENS)
    finally:
        engine.close()


def test_bank_arguments_cannot_be_split_into_expert_groups(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        switch = engine._loaded.switches[2]
        streamer = engine._loaded.streamer
        cap = streamer.capacity(2)
        experts = engine._loaded.layers[2].num_experts
        assert cap < experts
        x = mx.zeros((1, 8, engine.config["hidden_size"]))
        indices = mx.array(np.arange(8 * engine._loaded.k).reshape(1, 8, -1) % experts)
        reads = engine._loaded.store.reads
        with pytest.raises(UnsupportedModelError) as refused:
            switch(x, indices, "bank argument")
        assert str(refused.value).startswith("expert layer 2: ")
        assert f"raise the expert cache to at least {experts} experts per layer" in str(refused.value)
        assert engine._loaded.store.reads == reads  # nothing read
        assert switch._binding.extra == ((), {})  # the next call is a plain one again
        assert _tokens(engine) == long_prompt_reference(path, N_TOKENS)
    finally:
        engine.close()


def test_switch_exposes_the_replaced_modules_attributes_but_not_dunders(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        switch = engine._loaded.switches[0]
        assert switch.gate_proj is switch.inner_module.gate_proj  # the family may read the bank
        with pytest.raises(AttributeError):
            switch.__not_an_attribute__  # noqa: B018
    finally:
        engine.close()


PARAMS = [ExpertParam("w", "U32", (4, 8), 128), ExpertParam("s", "F32", (4,), 16)]


def test_a_pool_with_every_slot_pinned_refuses_naming_its_size_and_the_key() -> None:
    cache = ExpertCache(SlotPool(PARAMS, 2), "lru", layer_experts={0: 8})
    pinned = {(0, 0), (0, 1)}
    cache.assign((0, 0), pinned)
    cache.assign((0, 1), pinned)
    with pytest.raises(RuntimeError, match=r"all 2 slots are pinned; cannot place \(0, 5\)"):
        cache.assign((0, 5), pinned)
    assert set(cache.resident()) == pinned  # nothing was evicted by the refusal


@pytest.mark.parametrize("fails", [False, True], ids=["read", "read-fails"])
def test_a_layer_call_waits_for_a_warm_start_read_holding_the_slot_it_needs(fails: bool) -> None:
    """Every unpinned slot being filled by the warm start: the call waits for a read, then takes
    that slot (a failed read frees it); a prefetch (plain ``assign``) is refused instead of waiting."""
    cache = ExpertCache(SlotPool(PARAMS, 2), "lru", layer_experts={0: 8, 1: 8})
    log: list[str] = []

    def read() -> int:
        if fails:
            raise ExpertReadError("layer 1 expert 6: simulated read failure (EIO)")
        return 144

    assert cache.claim_free((1, 6), lambda slot: _ReadOnDemand(read, log))
    cache.assign((0, 2), {(0, 2)})
    with pytest.raises(RuntimeError, match="all 2 slots are pinned"):
        cache.assign((0, 3), {(0, 2), (0, 3)})  # a prefetch does not wait
    assert log == [] and (1, 6) in cache.pending
    slot = cache.assign_or_wait((0, 3), {(0, 2), (0, 3)})
    assert log == ["waited"] and not cache.pending
    assert set(cache.resident()) == {(0, 2), (0, 3)} and cache.lookup((0, 3)) == slot
    # nothing being read and every slot pinned: a layer call is refused too (no endless wait)
    with pytest.raises(RuntimeError, match=r"all 2 slots are pinned; cannot place \(1, 1\)"):
        cache.assign_or_wait((1, 1), {(0, 2), (0, 3)})


def test_a_lookup_of_an_expert_being_read_by_the_warm_start_waits_for_the_read() -> None:
    cache = ExpertCache(SlotPool(PARAMS, 2), "lru", layer_experts={0: 8})
    log: list[str] = []
    assert cache.claim_free((0, 6), lambda slot: _ReadOnDemand(lambda: 144, log))
    slot = cache.lookup((0, 6))
    assert log == ["waited"] and slot is not None and not cache.pending  # never a half-filled slot
    failed = ExpertCache(SlotPool(PARAMS, 2), "lru", layer_experts={0: 8})

    def eio() -> int:
        raise ExpertReadError("layer 0 expert 6: simulated read failure (EIO)")

    assert failed.claim_free((0, 6), lambda slot: _ReadOnDemand(eio, log))
    assert failed.lookup((0, 6)) is None and failed.free_slots == 2  # a miss: the request reads it


class _FakeStore:
    """A store whose reads finish at once (filling the slot with the expert id) and are logged."""

    def __init__(self) -> None:
        self.submitted: list[tuple[int, int]] = []

    def submit(self, layer: int, expert: int, dests: list[Any]) -> "Future[int]":
        self.submitted.append((layer, expert))
        for d in dests:
            d[:] = expert
        f: Future[int] = Future()
        f.set_result(sum(d.nbytes for d in dests))
        return f


def _streamer(slots: int, store: Any, *, prefetch: bool = False) -> ExpertStreamer:
    layers = [LayerExperts(i, f"model.layers.{i}.mlp.switch_mlp", 8, PARAMS) for i in range(2)]
    one = layers[0].expert_bytes
    return ExpertStreamer(layers, store, cache_bytes=slots * one, experts_per_token=2, prefetch=prefetch)


def test_prefetch_never_takes_a_slot_the_warm_start_is_filling() -> None:
    store = _FakeStore()
    streamer = _streamer(4, store)
    cache = streamer.cache_of_layer[0]
    assert cache.pool.n_slots == 4 and cache is streamer.cache_of_layer[1]
    warm: dict[tuple[int, int], Future[int]] = {}
    for key in [(1, 6), (1, 7)]:  # the warm start reads two experts; their reads are still running
        assert cache.claim_free(key, lambda slot, key=key: warm.setdefault(key, Future()))  # type: ignore[misc]
    slots = streamer.begin(0, np.array([2, 3]))  # a layer call pins the other two
    streamer.finish(slots)
    streamer.prefetch_experts(1, np.array([5]))  # a prediction finds no slot it may take
    assert (1, 5) not in cache and store.submitted == [(0, 2), (0, 3)]
    for key, f in warm.items():
        f.set_result(1)
    streamer.release_pins()
    assert {(1, 6), (1, 7), (0, 2), (0, 3)} == set(cache.resident()) and not cache.pending
    streamer.prefetch_experts(1, np.array([5]))  # now an unpinned slot is taken
    assert (1, 5) in streamer._inflight
    streamer.drain_prefetch()
    assert (1, 5) in cache


class _ReadOnDemand(Future):  # type: ignore[type-arg]
    """A warm-start read that runs when someone waits for it (so a request's wait is certain)."""

    def __init__(self, read: Callable[[], int], log: list[str]) -> None:
        super().__init__()
        self._read, self._log = read, log

    def result(self, timeout: float | None = None) -> int:
        if not self.done():
            self._log.append("waited")
            try:
                self.set_result(self._read())
            except Exception as e:  # (any error: a fault of the test itself must fail it, not hang it)
                self.set_exception(e)
        return super().result(timeout)


@pytest.mark.parametrize("fails", [False, True], ids=["read", "read-fails"])
def test_request_waits_for_an_expert_the_warm_start_is_reading(tiny_model, fails: bool) -> None:
    """The warm start's reads are still running when a request comes (a partial cache: its layer
    calls also have to evict around them); the request waits for them and its answer is exact."""
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "partial")), measure_disk=False)
    futures: list[_ReadOnDemand] = []
    try:
        streamer, store = engine._loaded.streamer, engine._loaded.store
        events: list[tuple[str, tuple[int, int]]] = []  # ("warm" | "request", key), in order
        real_read, real_submit = store.read_into, store.submit

        def request_read(layer: int, expert: int, dests: Any) -> Future[int]:
            events.append(("request", (layer, expert)))
            return real_submit(layer, expert, dests)

        store.submit = request_read  # type: ignore[method-assign]
        log: list[str] = []
        warm = [(layer, e) for layer in range(len(streamer.layers)) for e in range(3)]
        for layer, e in warm:
            cache = streamer.cache_of_layer[layer]

            def fill(slot: int, layer: int = layer, e: int = e, cache: Any = cache) -> Future[int]:
                dests = cache.pool.dests(slot)

                def read() -> int:
                    events.append(("warm", (layer, e)))
                    if fails:
                        raise ExpertReadError(f"layer {layer} expert {e}: simulated read failure (EIO)")
                    return real_read(layer, e, dests)

                futures.append(_ReadOnDemand(read, log))
                return futures[-1]

            assert cache.claim_free((layer, e), fill)
        assert _tokens(engine) == long_prompt_reference(path, N_TOKENS)
        waited = [key for key, f in zip(warm, futures) if f.done()]
        assert waited and len(log) == len(waited)
        for key in waited:
            sources = [source for source, k in events if k == key]
            # the warm read came first: the request never read (or computed with) the slot before it
            # ended; a failed one was then read by the request itself
            assert sources[0] == "warm" and (sources[1:2] == ["request"] if fails else True)
        if not fails:
            assert any(sources == ["warm"] for sources in ([s for s, k in events if k == key] for key in waited))
    finally:
        for f in futures:
            if not f.done():
                f.set_result(0)
        engine.close()


def test_prefetch_into_a_pool_that_holds_every_expert_is_exact(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "all"), prefetch=True), measure_disk=False)
    try:
        streamer = engine._loaded.streamer
        assert all(c.holds_all for c in streamer.caches)
        drains = 0
        real_drain = streamer.drain_prefetch

        def drain() -> None:
            nonlocal drains
            drains += bool(streamer._inflight)
            real_drain()

        streamer.drain_prefetch = drain  # type: ignore[method-assign]
        assert _tokens(engine) == long_prompt_reference(path, N_TOKENS)
        counters = engine.expert_counters()
        assert drains and counters["prefetched_hits"] > 0  # predictions were read and then used
        assert counters["device_routed_calls"] > 0  # the layers became whole and left the host path
        # nothing read twice: every byte read is an expert still resident (a whole pool evicts nothing)
        resident = sum(len(list(c.resident())) for c in streamer.caches)
        assert counters["bytes_read"] == resident * streamer.layers[0].expert_bytes
    finally:
        engine.close()


def test_mlx_arrays_that_do_not_share_memory_with_numpy_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real_view = mx.view

    class CopyingMx:
        """MLX as on a backend where a NumPy view of an array is a copy."""

        def __getattr__(self, name: str) -> Any:
            return getattr(mx, name)

        @staticmethod
        def view(arr: mx.array, dtype: Any) -> mx.array:
            return mx.array(np.array(real_view(arr, dtype)))

    monkeypatch.setattr(expert_cache, "mx", CopyingMx())
    with pytest.raises(RuntimeError, match="do not share memory with their NumPy views"):
        SlotPool(PARAMS, 2)


def test_preload_on_a_rank_reads_only_its_own_share_of_the_experts() -> None:
    from types import SimpleNamespace

    store = _FakeStore()
    streamer = _streamer(16, store)  # 2 layers x 8 experts: the pool holds them all
    assert streamer.caches[0].holds_all
    streamer.parallel = SimpleNamespace(owns=lambda e: int(e) % 2 == 1)  # type: ignore[assignment]  # rank 1 of 2
    assert streamer.preload() == 8 * sum(p.nbytes for p in PARAMS)
    assert sorted(store.submitted) == [(layer, e) for layer in range(2) for e in range(1, 8, 2)]
