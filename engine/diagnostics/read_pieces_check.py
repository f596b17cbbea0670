"""Whole-expert reads against reads cut into pieces, on this machine's disk (the self-check's "read pieces").

The engine cuts each expert's read into pieces of ``READ_PIECE_BYTES`` that the I/O threads share
(engine.storage.expert_store). Measured on two Linux disks that was faster (top-10 on 8 threads
reads in two uneven waves when each expert is one read), but only a Mac can say for its SSD: this
check reads layer-shaped batches (K experts of Qwen3.5-397B's size, waiting for all K, as decode
does) from a test file, cold, both ways, interleaved, and reports the two rates.
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
    """Cold read rates of layer-shaped batches, bytes/s: whole experts and pieces (medians)."""

    whole: float
    pieces: float
    batches: int  # measured per mode
    experts_per_batch: int
    threads: int

    @property
    def ratio(self) -> float:
        """Pieces over whole reads (above 1: pieces read faster)."""
        return self.pieces / self.whole if self.whole > 0 else 0.0


def compare_read_pieces(directory: Path, *, experts: int = 30, per_batch: int = 10, threads: int = 8,
                        expert_bytes: int = EXPERT_BYTES, piece_bytes: int = READ_PIECE_BYTES,
                        rounds: int = 3) -> PieceComparison:  # fmt: skip
    """Write ``experts`` random experts to a file in ``directory``, then read them cold in batches of
    ``per_batch``, whole and in pieces, alternating, ``rounds`` times; the file is removed after."""
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
        stores = {mode: ExpertStore([], packed=[layer], cold=True, io_threads=threads, verify="never",
                                    piece_bytes=piece_bytes if mode == "pieces" else 0)  # fmt: skip
                  for mode in ("whole", "pieces")}
        rates: dict[str, list[float]] = {"whole": [], "pieces": []}
        buffers = [np.empty(expert_bytes, dtype=np.uint8) for _ in range(per_batch)]
        try:
            for _ in range(rounds):
                for mode, store in stores.items():
                    store.drop_page_cache()
                    done, elapsed = 0, 0.0
                    for start in range(0, experts - per_batch + 1, per_batch):
                        t0 = time.perf_counter()
                        futures = [store.submit(0, e, [b]) for e, b in zip(range(start, start + per_batch), buffers)]
                        done += sum(f.result() for f in futures)
                        elapsed += time.perf_counter() - t0
                    rates[mode].append(done / elapsed if elapsed > 0 else 0.0)
        finally:
            for store in stores.values():
                store.close()
    return PieceComparison(statistics.median(rates["whole"]), statistics.median(rates["pieces"]),
                           rounds * (experts // per_batch), per_batch, threads)  # fmt: skip
