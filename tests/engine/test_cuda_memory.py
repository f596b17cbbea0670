"""CUDA placement of slot pools (engine/model/cuda_memory.py), run here through a fake CUDA runtime.

The project's CI has no GPU: these tests replace MLX's device query and the CUDA runtime library
with fakes that record every call, and check what the engine asks of CUDA (which pages, which
location, waiting or not), that a CUDA error is reported and leaves the pool usable, and that off
CUDA nothing is called at all.
"""

from __future__ import annotations

import ctypes
import logging
from types import SimpleNamespace
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from engine.model import cuda_memory
from engine.model.expert_cache import SlotPool
from engine.storage.expert_layout import ExpertParam


class FakeRuntime:
    """Records cudaMemAdvise / cudaMemPrefetchAsync / cudaStreamSynchronize; returns set error codes."""

    def __init__(self, advise_err: int = 0, prefetch_err: int = 0, sync_err: int = 0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.errs = {"advise": advise_err, "prefetch": prefetch_err, "sync": sync_err}

    def cudaMemAdvise(self, ptr: int, size: int, advice: int, loc: Any) -> int:  # noqa: N802 (CUDA's name)
        self.calls.append(("advise", ptr, size, advice, (loc.type, loc.id)))
        return self.errs["advise"]

    def cudaMemPrefetchAsync(self, ptr: int, size: int, loc: Any, flags: int, stream: Any) -> int:  # noqa: N802
        self.calls.append(("prefetch", ptr, size, (loc.type, loc.id), flags, stream))
        return self.errs["prefetch"]

    def cudaStreamSynchronize(self, stream: Any) -> int:  # noqa: N802
        self.calls.append(("sync", stream))
        return self.errs["sync"]


@pytest.fixture
def no_library_cache() -> Any:
    cuda_memory._library.cache_clear()
    yield
    cuda_memory._library.cache_clear()


def _on_cuda(monkeypatch: pytest.MonkeyPatch, rt: FakeRuntime | None) -> None:
    monkeypatch.setattr(cuda_memory, "_runtime", lambda: rt)


def _buffers() -> list[np.ndarray]:
    return [np.zeros(4096, dtype=np.uint8), np.zeros(100, dtype=np.uint8)]


def test_off_cuda_nothing_is_placed_and_no_runtime_is_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: list[str] = []
    def library() -> FakeRuntime:
        loaded.append("cudart")
        return FakeRuntime()

    monkeypatch.setattr(cuda_memory, "_library", library)
    # this machine's MLX (CPU) and a Metal-like GPU without CUDA
    assert cuda_memory.active() is False
    metal = SimpleNamespace(default_device=lambda: "gpu", gpu="gpu", cuda=SimpleNamespace(is_available=lambda: False))
    monkeypatch.setattr(cuda_memory, "mx", metal)
    assert cuda_memory.prefer_host(_buffers()) is False
    assert cuda_memory.to_device(_buffers(), wait=True) is False
    # an MLX without the cuda module at all
    monkeypatch.setattr(cuda_memory, "mx", SimpleNamespace(default_device=lambda: "gpu", gpu="gpu"))
    assert cuda_memory.active() is False
    assert loaded == []


def test_on_cuda_the_runtime_mlx_loaded_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = FakeRuntime()
    cuda = SimpleNamespace(default_device=lambda: "gpu", gpu="gpu", cuda=SimpleNamespace(is_available=lambda: True))
    monkeypatch.setattr(cuda_memory, "mx", cuda)
    monkeypatch.setattr(cuda_memory, "_library", lambda: rt)
    assert cuda_memory.active() is True
    assert cuda_memory.to_device(_buffers()) is True
    assert [c[0] for c in rt.calls] == ["prefetch", "prefetch"]


def test_prefer_host_keeps_pages_on_the_host_mapped_for_gpu_0(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = FakeRuntime()
    _on_cuda(monkeypatch, rt)
    bufs = _buffers()
    assert cuda_memory.prefer_host(bufs) is True
    expected = []
    for b in bufs:
        expected.append(("advise", b.ctypes.data, b.nbytes, 3, (2, 0)))  # preferred location: host
        expected.append(("advise", b.ctypes.data, b.nbytes, 5, (1, 0)))  # accessed by: device 0
    assert rt.calls == expected


def test_to_device_prefetches_each_buffer_and_waits_only_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = FakeRuntime()
    _on_cuda(monkeypatch, rt)
    bufs = _buffers()
    assert cuda_memory.to_device(bufs) is True
    assert rt.calls == [("prefetch", b.ctypes.data, b.nbytes, (1, 0), 0, None) for b in bufs]
    rt.calls.clear()
    assert cuda_memory.to_device(bufs[:1], wait=True) is True
    assert [c[0] for c in rt.calls] == ["prefetch", "sync"]


@pytest.mark.parametrize(
    ("errors", "call", "message"),
    [
        ({"advise_err": 2}, lambda: cuda_memory.prefer_host(_buffers()), "cudaMemAdvise(host) failed with CUDA error 2"),
        ({"prefetch_err": 700}, lambda: cuda_memory.to_device(_buffers()), "cudaMemPrefetchAsync(GPU) failed with CUDA error 700"),
        ({"sync_err": 999}, lambda: cuda_memory.to_device(_buffers(), wait=True), "cudaStreamSynchronize failed with CUDA error 999"),
    ],
)
def test_a_cuda_error_is_logged_and_reported_as_not_placed(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, errors: dict[str, int], call: Any, message: str
) -> None:
    rt = FakeRuntime(**errors)
    _on_cuda(monkeypatch, rt)
    with caplog.at_level(logging.WARNING, logger="moebar.engine"):
        assert call() is False
    assert any(message in r.getMessage() and "keeps its placement" in r.getMessage() for r in caplog.records)
    # every buffer was still attempted (one failure does not skip the others)
    assert sum(1 for c in rt.calls if c[0] in ("advise", "prefetch")) >= 2


def test_library_tries_each_runtime_name_and_sets_signatures(
    monkeypatch: pytest.MonkeyPatch, no_library_cache: None
) -> None:
    tried: list[str] = []

    class Fn:
        argtypes: list[Any] | None = None

    lib = SimpleNamespace(cudaMemAdvise=Fn(), cudaMemPrefetchAsync=Fn(), cudaStreamSynchronize=Fn())

    def cdll(name: str) -> Any:
        tried.append(name)
        if name != "libcudart.so.12":
            raise OSError(f"{name}: cannot open shared object file")
        return lib

    monkeypatch.setattr(cuda_memory.ctypes, "CDLL", cdll)
    assert cuda_memory._library() is lib
    assert tried == ["libcudart.so.13", "libcudart.so.12"]
    assert lib.cudaMemAdvise.argtypes[-1] is cuda_memory._MemLocation
    assert lib.cudaMemPrefetchAsync.argtypes[2] is cuda_memory._MemLocation
    assert lib.cudaStreamSynchronize.argtypes == [ctypes.c_void_p]


def test_no_runtime_library_warns_once_and_pools_stay_unplaced(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, no_library_cache: None
) -> None:
    def cdll(name: str) -> Any:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(cuda_memory.ctypes, "CDLL", cdll)
    cuda = SimpleNamespace(default_device=lambda: "gpu", gpu="gpu", cuda=SimpleNamespace(is_available=lambda: True))
    monkeypatch.setattr(cuda_memory, "mx", cuda)
    with caplog.at_level(logging.WARNING, logger="moebar.engine"):
        assert cuda_memory.to_device(_buffers()) is False
        assert cuda_memory.prefer_host(_buffers()) is False
    warnings = [r.getMessage() for r in caplog.records if "no CUDA runtime library" in r.getMessage()]
    assert len(warnings) == 1  # looked up once (lru_cache), not on every layer call


def test_slot_pool_places_exactly_the_slots_it_is_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    rt = FakeRuntime()
    _on_cuda(monkeypatch, rt)
    params = [ExpertParam("w", "U32", (4, 8), 128), ExpertParam("s", "F32", (4,), 16)]
    pool = SlotPool(params, 3)
    views = pool._views
    assert pool.slots_to_device([2]) is True
    assert [(c[1], c[2]) for c in rt.calls] == [(views[0][2].ctypes.data, 128), (views[1][2].ctypes.data, 16)]
    rt.calls.clear()
    assert pool.slots_to_device(wait=True) is True  # all slots: each whole array, then a wait
    assert [c[:3] for c in rt.calls[:2]] == [("prefetch", views[0].ctypes.data, 3 * 128), ("prefetch", views[1].ctypes.data, 3 * 16)]
    assert rt.calls[2:] == [("sync", None)]
    rt.calls.clear()
    assert pool.prefer_host() is True
    assert {c[1] for c in rt.calls} == {v.ctypes.data for v in views}
    # the placement never changes what the slots hold
    views[0][1, :] = 7
    assert int(np.array(mx.view(pool.arrays["w"][1], mx.uint8)).reshape(-1)[0]) == 7
