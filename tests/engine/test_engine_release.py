"""What a failed start releases, and which experts a rank warms.

An Engine whose construction raises (a refused rank, a lost peer) stops its warm start and closes
the expert store's files and I/O threads; so does the disk measurement when it raises. A rank
warms only the experts it owns, even when started on the whole model.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

import engine.engine as engine_mod
from engine.engine import Engine, measure_expert_read_speed
from engine.model.expert_parallel import DistributedSetupError, ExpertParallel
from engine.model.hot_set import hot_set_path, read_hot_set
from engine.model.loader import inspect_experts
from engine.storage.expert_layout import ExpertParam, LayerExperts
from engine.storage.expert_store import ExpertStore
from engine.types import EngineOptions
from exactness import share_tokenizers
from test_hot_set import FakeStore, _streamer, _write


@pytest.fixture(autouse=True)
def _tokenizer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    share_tokenizers(monkeypatch)


@pytest.fixture(scope="module")
def model(tiny_model: Any) -> Path:
    return tiny_model("qwen3_moe", 4)


def _closes(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The ExpertStores closed from now on."""
    closed: list[Any] = []
    real = ExpertStore.close

    def close(self: ExpertStore) -> None:
        closed.append(self)
        real(self)

    monkeypatch.setattr(ExpertStore, "close", close)
    return closed


def _loads(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The StreamedModels Engine.load makes from now on."""
    loads: list[Any] = []
    real = engine_mod.load_streamed_model

    def load(*args: Any, **kwargs: Any) -> Any:
        loads.append(real(*args, **kwargs))
        return loads[-1]

    monkeypatch.setattr(engine_mod, "load_streamed_model", load)
    return loads


def _warm_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "moebar-warm-start" and t.is_alive()]


def test_a_refused_rank_stops_the_warm_start_and_closes_the_store(model: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    closed, loads = _closes(monkeypatch), _loads(monkeypatch)
    monkeypatch.setattr(engine_mod, "read_hot_set", lambda path, streamer: [(0, 1), (0, 2), (1, 3)])

    def refuse(streamer: Any, model_dir: Path, fields: dict[str, Any]) -> None:
        raise DistributedSetupError("rank 1 was started on another model or other options than rank 0")

    monkeypatch.setattr(engine_mod, "attach_expert_parallel", refuse)
    with pytest.raises(DistributedSetupError):
        Engine.load(model, EngineOptions(cache_mb=1, hot_set_dir=str(tmp_path)), measure_disk=False)
    assert len(loads) == 1 and loads[0].store in closed
    assert not _warm_threads()


def test_a_failing_plan_closes_the_store(model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed, loads = _closes(monkeypatch), _loads(monkeypatch)

    def fail(**kwargs: Any) -> None:
        raise ValueError("no plan")

    monkeypatch.setattr(engine_mod, "make_plan", fail)
    with pytest.raises(ValueError, match="no plan"):
        Engine.load(model, EngineOptions(cache_mb=1), measure_disk=False)
    assert len(loads) == 1 and loads[0].store in closed


def test_the_disk_measurement_closes_its_store_when_picking_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    stores: list[Any] = []

    class Store:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.closed = False
            stores.append(self)

        def holds(self, layer: int, expert: int) -> bool:
            raise OSError("the share's layer file went away")

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(engine_mod, "ExpertStore", Store)
    layers = [LayerExperts(0, "model.layers.0.mlp.switch_mlp", 4, [ExpertParam("w", "U8", (16,), 16)])]
    with pytest.raises(OSError, match="went away"):
        measure_expert_read_speed(layers, samples=4, packed=[SimpleNamespace(rank=1, ranks=2)])  # type: ignore[list-item]
    assert len(stores) == 1 and stores[0].closed


def test_read_hot_set_keeps_only_this_ranks_experts_once_joined(tmp_path: Path) -> None:
    path = _write(tmp_path / "h.json", {"hot_set": 1, "moe_layers": 2, "experts_per_layer": [8, 8], "policy": "lru",
                                        "layers": {"0": [3, 2, 1, 0], "1": [5, 4]}})
    streamer = _streamer(FakeStore(), slots=6)
    assert read_hot_set(path, streamer) == [(0, 3), (1, 5), (0, 2), (1, 4), (0, 1), (0, 0)]
    streamer.parallel = ExpertParallel(group=None, rank=1, size=2)
    assert read_hot_set(path, streamer) == [(0, 3), (1, 5), (0, 1)]
    streamer.parallel = ExpertParallel(group=None, rank=0, size=2)
    assert read_hot_set(path, streamer) == [(0, 2), (1, 4), (0, 0)]


def test_a_rank_on_the_whole_model_warms_only_the_experts_it_owns(model: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import mlx.core as mx

    sizes = [l.num_experts for l in inspect_experts(model).layers]
    _write(hot_set_path(tmp_path, model), {"hot_set": 1, "moe_layers": len(sizes), "experts_per_layer": sizes,
                                           "policy": "lru", "layers": {str(i): list(range(n)) for i, n in enumerate(sizes)}})

    def attach(streamer: Any, model_dir: Path, fields: dict[str, Any]) -> ExpertParallel:
        streamer.parallel = ExpertParallel(group=None, rank=1, size=2)  # rank 1 of 2, joined
        streamer.prefetch = False
        return streamer.parallel

    monkeypatch.setattr(engine_mod, "attach_expert_parallel", attach)
    monkeypatch.setattr(mx.distributed, "all_min", lambda x, group=None: x)  # one process plays every rank
    engine = Engine.load(model, EngineOptions(cache_mb=1, hot_set_dir=str(tmp_path)), measure_disk=False)
    try:
        assert engine.warmer is not None
        keys = engine.warmer.keys
        assert keys and all(e % 2 == 1 for _, e in keys), keys
        assert len(keys) == sum(len(range(1, n, 2)) for n in sizes)
    finally:
        engine.close()
