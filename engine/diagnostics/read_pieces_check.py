"""Whole-expert reads against reads cut into pieces, on this machine's disk (the self-check's "read pieces").

The engine can cut each expert's cold read into pieces of ``READ_PIECE_BYTES`` that the I/O
threads share: on this project's Linux VM that was faster past the page cache and not through it,
on the lent H100 machine's disk slower (a cold load measures both and keeps the faster:
engine.storage.read_choice). Only a Mac can say for its SSD: this check reads
layer-shaped batches (K experts of Qwen3.5-397B's size, waiting for all K, as decode does) from a
test file both ways, interleaved, past the page cache, through it from the disk, and from it.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.storage.expert_store import READ_PIECE_BYTES, ExpertStore
from engine.storage.packed_layout import PackedLayer, aligned

EXPERT_BYTES = 7_077_888  # one Qwen3.5-397B-A17B expert at 4 bits


@dataclass
class PieceComparison:
    """Read rates of layer-shaped batches, bytes/s (medians): whole experts and pieces, past the page
    cache, through it from the disk, and from it."""

    whole: float  # past the page cache (O_DIRECT / F_NOCACHE), from the disk
    pieces: float
    buffered_whole: float  # through the page cache, from the disk (its pages evicted first)
    buffered_pieces: float
    hot_whole: float  # the same batches served by the OS page cache (the experts read just before)
    hot_pieces: float
    batches: int  # measured per mode
    experts_per_batch: int
    threads: int

    @property
    def ratio(self) -> float:
        """Pieces over whole reads, cold (above 1: pieces read faster)."""
        return self.pieces / self.whole if self.whole > 0 else 0.0

    @property
    def buffered_ratio(self) -> float:
        """Pieces over whole reads through the page cache, from the disk."""
        return self.buffered_pieces / self.buffered_whole if self.buffered_whole > 0 else 0.0

    @property
    def hot_ratio(self) -> float:
        """Pieces over whole reads from the page cache (the cost of more, smaller calls)."""
        return self.hot_pieces / self.hot_whole if self.hot_whole > 0 else 0.0


def compare_read_pieces(directory: Path, *, experts: int = 30, per_batch: int = 10, threads: int = 8,
                        expert_bytes: int = EXPERT_BYTES, piece_bytes: int = READ_PIECE_BYTES,
                        rounds: int = 3) -> PieceComparison:  # fmt: skip
    """Write ``experts`` random experts to a file in ``directory``, then read them in batches of
    ``per_batch``, whole and in pieces, alternating (the order too), ``rounds`` times: past the page
    cache, through it from the disk, and from it; the file is removed after."""
    if per_batch < 1 or experts < per_batch or rounds < 1:
        raise ValueError(f"need experts >= per_batch >= 1 and rounds >= 1 (got {experts}, {per_batch}, {rounds})")
    stride = aligned(expert_bytes)
    with tempfile.TemporaryDirectory(dir=directory, prefix="moebar-pieces-") as tmp:
        path = Path(tmp) / "experts.bin"
        checksums = []
        with open(path, "wb") as f:
            for _ in range(experts):
                blob = os.urandom(expert_bytes)
                checksums.append(zlib.crc32(blob))
                f.write(blob + bytes(stride - expert_bytes))
            f.flush()
            os.fsync(f.fileno())
        layer = PackedLayer(path, stride, expert_bytes, tuple(checksums))
        rates: dict[str, list[float]] = {}
        buffers = [np.empty(expert_bytes, dtype=np.uint8) for _ in range(per_batch)]
        for kind in ("", "buffered_", "hot_"):
            stores = {mode: ExpertStore([], packed=[layer], cold=not kind, io_threads=threads, verify="never",
                                        piece_bytes=piece_bytes if mode == "pieces" else 0)  # fmt: skip
                      for mode in ("whole", "pieces")}
            try:
                if kind == "hot_":  # every expert in the page cache first
                    _read_batches(stores["whole"], experts, per_batch, buffers)
                for r in range(rounds):
                    for mode in ("whole", "pieces") if r % 2 == 0 else ("pieces", "whole"):
                        if kind != "hot_":
                            stores[mode].drop_page_cache()
                        rates.setdefault(kind + mode, []).append(_read_batches(stores[mode], experts, per_batch, buffers))
            finally:
                for store in stores.values():
                    store.close()
    med = {k: statistics.median(v) for k, v in rates.items()}
    return PieceComparison(med["whole"], med["pieces"], med["buffered_whole"], med["buffered_pieces"],
                           med["hot_whole"], med["hot_pieces"],
                           rounds * (experts // per_batch), per_batch, threads)  # fmt: skip


def _read_batches(store: ExpertStore, experts: int, per_batch: int, buffers: list[np.ndarray]) -> float:
    """Read the experts ``per_batch`` at a time, waiting for each batch as decode does; bytes/s."""
    done, elapsed = 0, 0.0
    for start in range(0, experts - per_batch + 1, per_batch):
        t0 = time.perf_counter()
        futures = [store.submit(0, e, [b]) for e, b in zip(range(start, start + per_batch), buffers)]
        done += sum(f.result() for f in futures)
        elapsed += time.perf_counter() - t0
    return done / elapsed if elapsed > 0 else 0.0
