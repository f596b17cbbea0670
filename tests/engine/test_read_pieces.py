"""An expert's read cut into pieces that the I/O threads share: the same bytes, one checksum, one
conversion, one count, and a failure in any piece fails the whole read after every piece is done.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.errors import ExpertReadError
from engine.model.expert_cache import ConvertBuffer
from engine.model.loader import inspect_experts
from engine.storage import expert_store
from engine.storage.expert_store import READ_PIECE_BYTES, ExpertStore, _slices
from engine.storage.packed_layout import ALIGNMENT, PackedLayer, aligned, open_packed_layout


def _buffers(layer: Any) -> list[np.ndarray]:
    return [np.zeros(p.nbytes, dtype=np.uint8) for p in layer.params]


def _whole(layers: list[Any], layer: int, expert: int) -> list[bytes]:
    store = ExpertStore(layers, piece_bytes=0)
    try:
        bufs = _buffers(layers[layer])
        store.read_into(layer, expert, bufs)
        return [b.tobytes() for b in bufs]
    finally:
        store.close()


def test_slices_cover_a_byte_range_of_buffers_laid_end_to_end() -> None:
    views = [memoryview(bytearray(b"abc")), memoryview(bytearray(b"defgh")), memoryview(bytearray(b"ij"))]
    assert [bytes(s) for s in _slices(views, 0, 10)] == [b"abc", b"defgh", b"ij"]
    assert [bytes(s) for s in _slices(views, 2, 9)] == [b"c", b"defgh", b"i"]
    assert [bytes(s) for s in _slices(views, 4, 6)] == [b"ef"]
    assert _slices(views, 10, 12) == []


@pytest.mark.parametrize("layout", ["safetensors", "packed", "packed-cold"])
@pytest.mark.parametrize("piece", [100, 4096])
def test_pieces_give_the_bytes_of_one_whole_read(packed_model: Path, monkeypatch: pytest.MonkeyPatch, layout: str,
                                                piece: int) -> None:  # fmt: skip
    layers = inspect_experts(packed_model).layers
    packed = open_packed_layout(packed_model, layers) if layout != "safetensors" else None
    expert_bytes = layers[0].expert_bytes
    want = {(l, e): _whole(layers, l, e) for l in (0, 3) for e in (0, 7, layers[0].num_experts - 1)}
    calls: list[int] = []
    real = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        calls.append(offset)
        return real(fd, buffers, offset)

    monkeypatch.setattr(expert_store.os, "preadv", counted)
    store = ExpertStore(layers, packed=packed, cold=layout == "packed-cold", piece_bytes=piece, io_threads=3,
                        verify="always")  # fmt: skip
    try:
        for (l, e), whole in want.items():
            bufs = _buffers(layers[l])
            assert store.submit(l, e, bufs).result(timeout=30) > 0  # pieces on the I/O threads
            assert [b.tobytes() for b in bufs] == whole
            bufs = _buffers(layers[l])
            store.read_into(l, e, bufs)  # the same pieces, one after another
            assert [b.tobytes() for b in bufs] == whole
        assert store.reads == 2 * len(want)  # an expert counts once, whatever its pieces
        stride = aligned(expert_bytes) if layout == "packed-cold" and store._use_direct else expert_bytes
        assert store.bytes_read == 2 * len(want) * stride
    finally:
        store.close()
    direct = layout == "packed-cold" and store._use_direct
    step = aligned(piece) if direct else piece
    if layout == "safetensors":
        per_expert = sum(-(-p.nbytes // step) for p in layers[0].params)
    else:
        per_expert = -(-(aligned(expert_bytes) if direct else expert_bytes) // step)
    assert per_expert > 1 or direct  # the case cuts reads (an O_DIRECT block holds a tiny expert whole: see below)
    assert len(calls) == 2 * len(want) * per_expert


def _blob_file(tmp_path: Path, experts: int, payload: int) -> tuple[PackedLayer, list[bytes]]:
    """A packed layer file of random experts (stride aligned) and its checksums."""
    rng = np.random.default_rng(0)
    stride = aligned(payload)
    blobs = [rng.integers(0, 256, payload, dtype=np.uint8).tobytes() for _ in range(experts)]
    path = tmp_path / "layer.bin"
    with open(path, "wb") as f:
        for b in blobs:
            f.write(b + bytes(stride - payload))
        f.flush()
        os.fsync(f.fileno())  # written back: its cached pages can be dropped
    return PackedLayer(path, stride, payload, tuple(zlib.crc32(b) for b in blobs)), blobs


def test_direct_pieces_are_aligned_and_fill_every_parameter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this OS")
    payload = 5 * ALIGNMENT + 123  # an expert spanning six aligned blocks, the last one part padding
    layer, blobs = _blob_file(tmp_path, 3, payload)
    sizes = [ALIGNMENT + 7, 3 * ALIGNMENT - 50, payload - 4 * ALIGNMENT + 43]  # parameters across the blocks
    assert sum(sizes) == payload
    seen: list[tuple[int, int]] = []
    real = os.preadv

    def counted(fd: int, buffers: list[memoryview], offset: int) -> int:
        seen.append((offset, sum(b.nbytes for b in buffers)))
        return real(fd, buffers, offset)

    monkeypatch.setattr(expert_store.os, "preadv", counted)
    store = ExpertStore([], packed=[layer], cold=True, piece_bytes=2 * ALIGNMENT, io_threads=4, verify="always")
    if not store._use_direct:
        store.close()
        pytest.skip("this filesystem refuses O_DIRECT")
    try:
        bufs = [np.zeros(n, dtype=np.uint8) for n in sizes]
        assert store.submit(0, 1, bufs).result(timeout=30) == aligned(payload)
        assert b"".join(b.tobytes() for b in bufs) == blobs[1]
    finally:
        store.close()
    base = layer.stride
    assert sorted(seen) == [(base, 2 * ALIGNMENT), (base + 2 * ALIGNMENT, 2 * ALIGNMENT), (base + 4 * ALIGNMENT, 2 * ALIGNMENT)]
    assert all(off % ALIGNMENT == 0 and n % ALIGNMENT == 0 for off, n in seen)


def _page_aligned_buffers(sizes: list[int]) -> list[np.ndarray]:
    """Buffers that start on page boundaries (as CUDA's managed slot pools may)."""
    import mmap

    out = []
    for n in sizes:
        out.append(np.frombuffer(mmap.mmap(-1, n), dtype=np.uint8))
        assert out[-1].ctypes.data % mmap.PAGESIZE == 0
    return out


def _direct_store(tmp_path: Path, payload: int) -> tuple[ExpertStore, PackedLayer, list[bytes]]:
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this OS")
    layer, blobs = _blob_file(tmp_path, 3, payload)
    store = ExpertStore([], packed=[layer], cold=True, piece_bytes=2 * ALIGNMENT, io_threads=4, verify="always")
    if not store._use_direct:
        store.close()
        pytest.skip("this filesystem refuses O_DIRECT")
    return store, layer, blobs


def test_direct_reads_land_in_page_aligned_slots_without_the_staging_copy(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    sizes = [2 * ALIGNMENT, ALIGNMENT // 2, ALIGNMENT // 2, 2 * ALIGNMENT]  # weights, scales, biases as a pool's
    store, layer, blobs = _direct_store(tmp_path, sum(sizes))
    copies: list[int] = []
    real_copy = expert_store._copy_out
    monkeypatch.setattr(expert_store, "_copy_out", lambda st, dests: copies.append(len(dests)) or real_copy(st, dests))
    try:
        aligned_bufs = _page_aligned_buffers(sizes)
        assert store.submit(0, 2, aligned_bufs).result(timeout=30) == sum(sizes)
        assert b"".join(b.tobytes() for b in aligned_bufs) == blobs[2] and copies == []
        # a slot off the page boundary (malloc'd memory) goes through the staging buffer
        shifted = [np.zeros(n + 1, dtype=np.uint8)[1:] for n in sizes]
        assert store.submit(0, 1, shifted).result(timeout=30) == sum(sizes)
        assert b"".join(b.tobytes() for b in shifted) == blobs[1] and copies
    finally:
        store.close()
    assert store.direct_into_dests


def test_converted_parameters_are_read_into_page_aligned_buffers() -> None:
    """Scales read as stored and converted into the slot: their read buffer starts on a page, so
    a cold read of a whole expert can still skip the staging copy where the slots are aligned."""
    import mmap

    from engine.model.expert_cache import SlotPool
    from engine.storage.expert_layout import ExpertParam

    params = [ExpertParam("w.weight", "U32", (64, 8), 2048), ExpertParam("w.scales", "BF16", (64, 4), 512)]
    pool = SlotPool(params, 3, slot_floats="F32")
    for slot in range(3):
        weight, scales = pool.dests(slot)
        assert isinstance(scales, ConvertBuffer) and scales.raw.nbytes == 512
        assert scales.raw.ctypes.data % mmap.PAGESIZE == 0


def test_memory_that_refuses_direct_reads_is_staged_from_then_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = [2 * ALIGNMENT, 2 * ALIGNMENT]
    store, layer, blobs = _direct_store(tmp_path, sum(sizes))
    bufs = _page_aligned_buffers(sizes)
    targets = {b.ctypes.data for b in bufs}
    real = os.preadv
    refused: list[int] = []

    def refusing(fd: int, buffers: list[memoryview], offset: int) -> int:
        if any(np.frombuffer(b, np.uint8).ctypes.data in targets for b in buffers):
            refused.append(offset)
            raise OSError(errno.EFAULT, "Bad address")  # (as the kernel says of memory it cannot pin)
        return real(fd, buffers, offset)

    monkeypatch.setattr(expert_store.os, "preadv", refusing)
    try:
        assert store.submit(0, 0, bufs).result(timeout=30) == sum(sizes)
        assert b"".join(b.tobytes() for b in bufs) == blobs[0]
        assert not store.direct_into_dests and refused
        before = len(refused)
        assert store.submit(0, 2, bufs).result(timeout=30) == sum(sizes)  # staged straight away now
        assert b"".join(b.tobytes() for b in bufs) == blobs[2] and len(refused) == before
    finally:
        store.close()


def test_the_staging_copy_fills_each_destination_from_its_place_in_the_block() -> None:
    import mmap

    staging = mmap.mmap(-1, 3 * ALIGNMENT)
    block = np.random.default_rng(0).integers(0, 256, 3 * ALIGNMENT, dtype=np.uint8)
    staging[:] = block.tobytes()
    targets = [np.zeros(n, dtype=np.uint8) for n in (ALIGNMENT + 7, 0, 2 * ALIGNMENT - 50)]
    # (what _slices gives: views into the slots, laid end to end; the block's tail is padding)
    expert_store._copy_out(staging, [memoryview(t).cast("B") for t in targets])
    assert b"".join(t.tobytes() for t in targets) == block[: 3 * ALIGNMENT - 43].tobytes()


def test_a_corrupt_piece_fails_the_checksum_of_the_whole_expert(tmp_path: Path) -> None:
    payload = 3 * ALIGNMENT
    layer, blobs = _blob_file(tmp_path, 2, payload)
    with open(layer.file, "r+b") as f:  # flip a byte in the expert's last piece
        f.seek(layer.stride + payload - 5)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x01]))
    store = ExpertStore([], packed=[layer], piece_bytes=ALIGNMENT, verify="first")
    try:
        with pytest.raises(ExpertReadError, match="checksum mismatch for layer 0 expert 1"):
            store.submit(0, 1, [np.zeros(payload, dtype=np.uint8)]).result(timeout=30)
        bufs = [np.zeros(payload, dtype=np.uint8)]
        store.submit(0, 0, bufs).result(timeout=30)
        assert bufs[0].tobytes() == blobs[0]
    finally:
        store.close()


def test_a_failed_piece_fails_the_read_only_after_the_others_finish(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = 4 * ALIGNMENT
    layer, _ = _blob_file(tmp_path, 2, payload)
    real = os.preadv
    finished: list[int] = []
    lock = threading.Lock()

    def flaky(fd: int, buffers: list[memoryview], offset: int) -> int:
        if offset == layer.stride:  # the first piece fails at once
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        time.sleep(0.05)  # the others land later
        n = real(fd, buffers, offset)
        with lock:
            finished.append(offset)
        return n

    monkeypatch.setattr(expert_store.os, "preadv", flaky)
    store = ExpertStore([], packed=[layer], piece_bytes=ALIGNMENT, io_threads=4)
    try:
        future = store.submit(0, 1, [np.zeros(payload, dtype=np.uint8)])
        with pytest.raises(ExpertReadError) as failed:
            future.result(timeout=30)
        assert len(finished) == 3  # every other piece was done before the read was reported failed
        message = str(failed.value)
        assert message.startswith("layer 0 expert 1: read failed") and str(layer.file) in message
        assert "Input/output error" in message and store.reads == 0
    finally:
        store.close()


def test_a_converted_parameter_is_converted_once_after_its_last_piece(tmp_path: Path) -> None:
    values = np.linspace(-3, 3, 3 * ALIGNMENT // 2, dtype=np.float32).astype(np.float16)  # 1.5 blocks of fp16
    raw = values.view(np.uint8)
    layer = PackedLayer(tmp_path / "layer.bin", aligned(raw.nbytes), raw.nbytes, (zlib.crc32(raw.tobytes()),))
    layer.file.write_bytes(raw.tobytes() + bytes(layer.stride - raw.nbytes))
    target = np.zeros(values.size * 4, dtype=np.uint8)
    finishes: list[int] = []

    class Counted(ConvertBuffer):
        def finish(self) -> None:
            finishes.append(1)
            super().finish()

    store = ExpertStore([], packed=[layer], piece_bytes=ALIGNMENT // 2, io_threads=3)
    try:
        dest = Counted(np.zeros(raw.nbytes, dtype=np.uint8), target, "F16", "F32")
        store.submit(0, 0, [dest]).result(timeout=30)
    finally:
        store.close()
    assert finishes == [1]
    assert np.array_equal(target.view(np.float32), values.astype(np.float32))


def test_the_default_piece_and_its_refusals() -> None:
    assert READ_PIECE_BYTES == 1 << 20 and READ_PIECE_BYTES % ALIGNMENT == 0
    with pytest.raises(ValueError, match="piece_bytes must be >= 0"):
        ExpertStore([], piece_bytes=-1)


def test_the_self_check_compares_whole_reads_with_pieces_on_this_disk(tmp_path: Path) -> None:
    from engine.diagnostics.read_pieces_check import compare_read_pieces

    c = compare_read_pieces(tmp_path, experts=6, per_batch=3, threads=2, expert_bytes=3 * ALIGNMENT + 5,
                            piece_bytes=ALIGNMENT, rounds=2)  # fmt: skip
    assert c.whole > 0 and c.pieces > 0 and c.ratio == pytest.approx(c.pieces / c.whole)
    assert c.hot_whole > 0 and c.hot_pieces > 0 and c.hot_ratio == pytest.approx(c.hot_pieces / c.hot_whole)
    assert c.buffered_whole > 0 and c.buffered_ratio == pytest.approx(c.buffered_pieces / c.buffered_whole)
    assert (c.batches, c.experts_per_batch, c.threads) == (4, 3, 2)
    assert list(tmp_path.iterdir()) == []  # the test file is gone
    with pytest.raises(ValueError, match="need experts >= per_batch"):
        compare_read_pieces(tmp_path, experts=2, per_batch=3)


@pytest.mark.parametrize("cold, buffered, hot, hint", [
    ((1e9, 1.5e9), (1e9, 1e9), (4e9, 3e9), "the defaults suit this disk"),
    ((2e9, 1e9), (1e9, 1e9), (4e9, 3e9), "whole cold reads are faster here (cold mode measures both"),
    ((1e9, 1.5e9), (1e9, 1.2e9), (4e9, 3.9e9), "pieces are faster through the page cache here"),
    ((1e9, 1.5e9), (1e9, 1.2e9), (4e9, 3e9), "the defaults suit this disk"),  # the cache hits would pay
])
def test_the_self_check_names_the_setting_that_suits_the_disk(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                             cold: tuple[float, float], buffered: tuple[float, float],
                                                             hot: tuple[float, float], hint: str) -> None:  # fmt: skip
    from engine.diagnostics import read_pieces_check, selfcheck

    monkeypatch.setattr(read_pieces_check, "compare_read_pieces",
                        lambda d: read_pieces_check.PieceComparison(*cold, *buffered, *hot, 3, 10, 8))  # fmt: skip
    r = selfcheck.check_read_pieces(tmp_path)
    assert r.status == "PASS" and hint in r.detail and f"({cold[1] / cold[0]:.2f}x)" in r.detail
    assert f"from it {hot[1] / 1e9:.1f} / {hot[0] / 1e9:.1f} ({hot[1] / hot[0]:.2f}x)" in r.detail


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="Linux page-cache advice")
def test_pieces_read_only_their_expert_with_read_ahead_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Consecutive pieces of one expert look sequential to the kernel: with read-ahead on it read
    on past the expert (2.3x the bytes at half the rate, measured); the store turns it off."""
    from engine.platform.page_cache import cached_fraction
    from engine.platform_info import drop_file_cache

    payload = 16 * ALIGNMENT  # 256 KiB experts
    layer, blobs = _blob_file(tmp_path, 64, payload)
    size = layer.file.stat().st_size

    def resident_after_reading(store: ExpertStore) -> float:
        fd = store._fds[layer.file]
        drop_file_cache(fd)
        if cached_fraction(layer.file) > 0.01:
            pytest.skip("this filesystem keeps its pages whatever the advice (tmpfs)")
        try:
            for e in (5, 40):
                bufs = [np.zeros(payload, dtype=np.uint8)]
                store.submit(0, e, bufs).result(timeout=30)
                assert bufs[0].tobytes() == blobs[e]
        finally:
            store.close()
        return cached_fraction(layer.file) * size

    advised = resident_after_reading(ExpertStore([], packed=[layer], piece_bytes=ALIGNMENT, io_threads=2))
    assert advised <= 2 * payload + 2 * ALIGNMENT  # the two experts, give or take a page at each end
    monkeypatch.setattr(expert_store, "advise_random_reads", lambda fd: None)
    left_on = resident_after_reading(ExpertStore([], packed=[layer], piece_bytes=ALIGNMENT, io_threads=2))
    if left_on <= 2 * payload + 2 * ALIGNMENT:
        pytest.skip("this disk's read-ahead is off already: the advice cannot be seen here")
    assert left_on > advised


def test_read_ahead_is_turned_off_with_each_platform_s_call() -> None:
    from engine.platform_info import F_RDAHEAD, advise_random_reads

    calls: list[tuple[int, int, int]] = []
    advise_random_reads(7, platform="darwin", fcntl_fn=lambda fd, cmd, arg: calls.append((fd, cmd, arg)))
    assert calls == [(7, F_RDAHEAD, 0)]


def test_a_pool_shut_down_midway_fails_the_read_after_the_queued_pieces(tmp_path: Path) -> None:
    payload = 4 * ALIGNMENT
    layer, blobs = _blob_file(tmp_path, 2, payload)
    store = ExpertStore([], packed=[layer], piece_bytes=ALIGNMENT, io_threads=2)
    real = store._pool.submit
    queued: list[Any] = []

    def submit_twice(fn: Any, piece: Any) -> Any:
        if len(queued) == 2:
            raise RuntimeError("cannot schedule new futures after shutdown")
        queued.append(real(fn, piece))
        return queued[-1]

    store._pool.submit = submit_twice  # type: ignore[method-assign]
    try:
        bufs = [np.zeros(payload, dtype=np.uint8)]
        future = store.submit(0, 1, bufs)
        with pytest.raises(RuntimeError, match="after shutdown"):
            future.result(timeout=30)
        assert all(f.done() for f in queued) and bufs[0][: 2 * ALIGNMENT].tobytes() == blobs[1][: 2 * ALIGNMENT]
        assert store.reads == 0
    finally:
        store.close()
