"""The warm start's hot set (engine/model/hot_set.py): files it refuses, and the background reader.

A hot set file that cannot be used is ignored with a warning naming the file and what is wrong
(the model then starts cold, never fails). The warmer reads into free slots only, pauses while a
generation runs, stops when asked or when the pools are full, and survives failed reads and its
own errors; nothing it does is a timing assertion here (fake stores and a fake layer-call counter).
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import ExpertReadError
from engine.model import hot_set
from engine.model.hot_set import HotSetWarmer, hot_set_path, read_hot_set, save_hot_set
from engine.model.streamed_moe import ExpertStreamer
from engine.storage.expert_layout import ExpertParam, LayerExperts

PARAMS = [ExpertParam("w", "U32", (4, 8), 128), ExpertParam("s", "F32", (4,), 16)]
EXPERT_BYTES = 144


class FakeStore:
    """Reads that finish at once (or fail for the keys in ``failing``), logged in order."""

    def __init__(self, failing: set[tuple[int, int]] = frozenset(), owned: Any = None) -> None:  # type: ignore[assignment]
        self.submitted: list[tuple[int, int]] = []
        self.failing = set(failing)
        self.owned = owned
        self.on_submit: Any = None

    def holds(self, layer: int, expert: int) -> bool:
        return self.owned is None or (layer, expert) in self.owned

    def submit(self, layer: int, expert: int, dests: list[Any]) -> "Future[int]":
        self.submitted.append((layer, expert))
        if self.on_submit is not None:
            self.on_submit(layer, expert)
        f: Future[int] = Future()
        if (layer, expert) in self.failing:
            f.set_exception(ExpertReadError(f"layer {layer} expert {expert}: simulated read failure (EIO)"))
        else:
            f.set_result(EXPERT_BYTES)
        return f


def _streamer(store: Any, slots: int, layers: int = 2, experts: int = 8) -> ExpertStreamer:
    lx = [LayerExperts(i, f"model.layers.{i}.mlp.switch_mlp", experts, PARAMS) for i in range(layers)]
    return ExpertStreamer(lx, store, cache_bytes=slots * EXPERT_BYTES, experts_per_token=2, policy="lru")


def _write(path: Path, data: Any) -> Path:
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


GOOD = {"hot_set": 1, "moe_layers": 2, "experts_per_layer": [8, 8], "policy": "lru", "layers": {"0": [3, 1], "1": [5]}}


def test_saved_hot_set_reads_back_best_first_interleaved_across_layers(tmp_path: Path) -> None:
    store = FakeStore()
    streamer = _streamer(store, slots=6)
    for key in [(0, 1), (1, 5), (0, 3)]:  # (0, 3) used last: the most valuable under LRU
        streamer.ensure(key[0], np.array([key[1]]))
        streamer.release_pins()
    path = hot_set_path(tmp_path / "hot", tmp_path / "my-model")
    assert path.name.startswith("my-model-") and path.suffix == ".json"
    assert save_hot_set(streamer, path, "lru") == 3
    assert json.loads(path.read_text())["layers"] == {"0": [3, 1], "1": [5]}
    assert read_hot_set(path, _streamer(FakeStore(), slots=6)) == [(0, 3), (1, 5), (0, 1)]
    # a rank's share keeps only its own experts
    assert read_hot_set(path, _streamer(FakeStore(owned={(0, 1), (1, 5)}), slots=6)) == [(0, 1), (1, 5)]


def test_nothing_to_save_writes_no_file(tmp_path: Path) -> None:
    path = tmp_path / "hot.json"
    assert save_hot_set(_streamer(FakeStore(), slots=4), path, "lru") == 0  # an empty cache
    whole = _streamer(FakeStore(), slots=16)  # a pool holding every expert is preloaded, not warmed
    assert whole.caches[0].holds_all
    whole.preload()
    assert save_hot_set(whole, path, "lru") == 0
    assert not path.exists()


BAD = {
    "not-json": ("{not json", "hot set ignored: not readable JSON"),
    "not-utf8": (None, "hot set ignored: not readable JSON"),
    "not-an-object": ([1, 2], "hot set ignored: field 'hot_set' is not 1"),
    "other-version": ({**GOOD, "hot_set": 2}, "hot set ignored: field 'hot_set' is not 1"),
    "other-model-layers": ({**GOOD, "moe_layers": 60}, "it is from another model (60 MoE layers, this model has 2)"),
    "other-model-experts": ({**GOOD, "experts_per_layer": [8, 16]}, "it is from another model"),
    "layers-not-an-object": ({**GOOD, "layers": [[3, 1]]}, "hot set ignored: field 'layers' is not an object"),
    "layer-name-not-a-number": ({**GOOD, "layers": {"x": [1]}}, "hot set ignored: bad layer entry 'x'"),
    "layer-out-of-range": ({**GOOD, "layers": {"2": [1]}}, "hot set ignored: bad layer entry '2'"),
    "ids-not-a-list": ({**GOOD, "layers": {"0": 3}}, "hot set ignored: bad layer entry '0'"),
    "expert-out-of-range": ({**GOOD, "layers": {"1": [5, 8]}}, "layer 1 lists an expert id out of range"),
    "expert-not-an-int": ({**GOOD, "layers": {"0": ["3"]}}, "layer 0 lists an expert id out of range"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_unusable_hot_set_is_ignored_with_a_warning_naming_the_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str
) -> None:
    data, message = BAD[case]
    path = tmp_path / "hot.json"
    if data is None:
        path.write_bytes(b"\xff\xfe{}")
    else:
        _write(path, data)
    with caplog.at_level(logging.WARNING, logger=hot_set.log.name):
        assert read_hot_set(path, _streamer(FakeStore(), slots=6)) == []
    assert any(r.getMessage().startswith(f"{path}: ") and message in r.getMessage() for r in caplog.records), caplog.text


def test_absent_hot_set_is_a_cold_start_without_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=hot_set.log.name):
        assert read_hot_set(tmp_path / "none.json", _streamer(FakeStore(), slots=6)) == []
    assert caplog.records == []


def _warm(streamer: ExpertStreamer, keys: list[tuple[int, int]], max_in_flight: int = 2) -> HotSetWarmer:
    warmer = HotSetWarmer(streamer, keys, max_in_flight).start()
    assert warmer.join(timeout=30)
    return warmer


def test_warmer_fills_free_slots_only_and_stops_when_the_pools_are_full() -> None:
    store = FakeStore()
    streamer = _streamer(store, slots=4)
    keys = [(0, e) for e in range(8)]
    warmer = _warm(streamer, keys)
    assert store.submitted == keys[:4]  # the pool was full after four: nothing evicted, no more read
    assert warmer.started == 4 and warmer.bytes_read == 4 * EXPERT_BYTES
    assert set(streamer.caches[0].resident()) == set(keys[:4]) and not streamer.caches[0].pending


def test_warmer_skips_resident_experts_and_pools_that_hold_everything() -> None:
    store = FakeStore()
    streamer = _streamer(store, slots=4)
    streamer.ensure(0, np.array([1]))
    streamer.release_pins()
    store.submitted.clear()
    warmer = _warm(streamer, [(0, 1), (0, 2)])
    assert store.submitted == [(0, 2)] and warmer.started == 1
    whole = _streamer(FakeStore(), slots=16)
    warmer = _warm(whole, [(0, 1), (1, 2)])
    assert whole.store.submitted == [] and warmer.started == 0  # type: ignore[attr-defined]


def test_a_failed_warm_read_frees_its_slot_and_the_rest_go_on(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore(failing={(0, 2)})
    streamer = _streamer(store, slots=4)
    with caplog.at_level(logging.WARNING, logger=hot_set.log.name):
        warmer = _warm(streamer, [(0, 1), (0, 2), (0, 3)], max_in_flight=1)
    assert store.submitted == [(0, 1), (0, 2), (0, 3)]
    assert set(streamer.caches[0].resident()) == {(0, 1), (0, 3)} and streamer.caches[0].free_slots == 2
    assert warmer.bytes_read == 2 * EXPERT_BYTES
    assert "warm start: a read failed (layer 0 expert 2: simulated read failure (EIO))" in caplog.text


def test_an_error_in_the_warm_start_is_logged_and_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    store = FakeStore()
    streamer = _streamer(store, slots=4)
    with caplog.at_level(logging.WARNING, logger=hot_set.log.name):
        warmer = _warm(streamer, [(0, 1), (7, 0), (0, 2)])  # layer 7 does not exist
    assert "warm start stopped" in caplog.text
    assert store.submitted == [(0, 1)]  # the read started before the error still lands in its slot
    assert (0, 1) in streamer.caches[0] and not streamer.caches[0].pending


def test_stop_ends_the_warm_start_between_reads() -> None:
    store = FakeStore()
    streamer = _streamer(store, slots=8)
    keys = [(0, e) for e in range(6)]
    warmer = HotSetWarmer(streamer, keys, 1)
    store.on_submit = lambda layer, expert: warmer._stop.set() if expert == 1 else None
    warmer.start()
    assert warmer.join(timeout=30)  # it stopped by itself, between reads
    warmer.stop()
    assert store.submitted == [(0, 0), (0, 1)] and warmer.bytes_read == 2 * EXPERT_BYTES


class _Generating(ExpertStreamer):
    """A streamer whose layer-call counter moves for ``steps`` reads after a generation starts."""

    steps = 0

    @property  # type: ignore[override]
    def host_syncs(self) -> int:
        if self.steps > 0:
            self.steps -= 1
            self._calls += 1
        return self._calls

    @host_syncs.setter
    def host_syncs(self, value: int) -> None:
        self._calls = value


def test_warm_reads_pause_while_a_generation_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(HotSetWarmer, "IDLE_S", 0.0)  # idle as soon as the counter stops moving
    store = FakeStore()
    lx = [LayerExperts(i, f"model.layers.{i}.mlp.switch_mlp", 8, PARAMS) for i in range(2)]
    streamer = _Generating(lx, store, cache_bytes=8 * EXPERT_BYTES, experts_per_token=2)  # type: ignore[arg-type]
    during: list[int] = []

    def submit(layer: int, expert: int) -> None:
        during.append(streamer.steps)  # reads started while the generation ran
        if expert == 1:
            streamer.steps = 5  # a request arrives after the second read was started

    store.on_submit = submit
    warmer = _warm(streamer, [(0, e) for e in range(4)], max_in_flight=4)
    assert store.submitted == [(0, 0), (0, 1), (0, 2), (0, 3)] and warmer.started == 4
    assert during == [0, 0, 0, 0]  # no read started while the layer-call counter was moving
    assert streamer.steps == 0


def test_stop_while_waiting_for_a_generation_to_end() -> None:
    store = FakeStore()
    lx = [LayerExperts(i, f"model.layers.{i}.mlp.switch_mlp", 8, PARAMS) for i in range(2)]
    streamer = _Generating(lx, store, cache_bytes=8 * EXPERT_BYTES, experts_per_token=2)  # type: ignore[arg-type]
    waiting = threading.Event()
    warmer = HotSetWarmer(streamer, [(0, e) for e in range(4)], 4)
    real_wait = warmer._wait_idle

    def wait_idle() -> int:
        waiting.set()
        return real_wait()

    warmer._wait_idle = wait_idle  # type: ignore[method-assign]
    streamer.steps = 10**9  # a generation that does not end
    warmer.start()
    assert waiting.wait(timeout=30)
    warmer.stop()
    assert not warmer._thread.is_alive() and warmer.started == 0 and store.submitted == []


class _FifoWithoutRanking:
    """A replacement policy with no ``ranking`` (as a policy object given by a replay tool may be)."""

    def __init__(self) -> None:
        self.order: list[tuple[int, int]] = []

    def touch(self, key: tuple[int, int]) -> None:
        pass

    def miss(self, key: tuple[int, int]) -> None:
        pass

    def insert(self, key: tuple[int, int]) -> None:
        self.order.append(key)

    def remove(self, key: tuple[int, int]) -> None:
        self.order.remove(key)

    def victim(self, exclude: set[tuple[int, int]]) -> tuple[int, int] | None:
        return next((k for k in self.order if k not in exclude), None)


def test_a_policy_without_ranking_saves_the_most_recently_placed_first(tmp_path: Path) -> None:
    from engine.model.expert_cache import ExpertCache, SlotPool

    store = FakeStore()
    streamer = _streamer(store, slots=3)
    cache = ExpertCache(SlotPool(PARAMS, 3), _FifoWithoutRanking(), layer_experts={0: 8, 1: 8})
    streamer.caches = [cache]
    streamer.cache_of_layer = [cache, cache]
    for layer, e in [(0, 4), (1, 2), (0, 7)]:
        streamer.ensure(layer, np.array([e]))
        streamer.release_pins()
    assert cache.hot_keys() == [(0, 7), (1, 2), (0, 4)]
    path = tmp_path / "hot.json"
    assert save_hot_set(streamer, path, "fifo") == 3
    assert read_hot_set(path, _streamer(FakeStore(), slots=3)) == [(0, 7), (1, 2), (0, 4)]
