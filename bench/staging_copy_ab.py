"""Cold reads into the expert slots, side by side: ``O_DIRECT`` straight into page-aligned slots
(``direct``) against a staging buffer copied out with NumPy (``numpy``: releases the GIL) or by a
memoryview slice assignment (``memoryview``: holds it), as ``ExpertStore`` reads.

Writes ``--experts`` random experts of Qwen3.5-397B's size (7,077,888 bytes, nine parameters) to
a file in ``--dir``, then reads them cold in decode-shaped batches (``--k`` at a time on
``--threads`` I/O threads, whole and in 1 MiB pieces), alternating the variants, ``--rounds``
times each. ``--slots``: where the experts land: ``pool`` (the engine's ``SlotPool``: CUDA managed
memory kept on the host where MLX runs on CUDA; a direct read falls back to staging where its
memory is not page-aligned or refuses it), ``aligned`` (page-aligned host memory), ``numpy``
(``np.empty``: never aligned, so ``direct`` stages too). ``--busy mlx``: the main thread evaluates
small matmuls meanwhile and their rate is reported too. Linux only (``O_DIRECT``).

Usage: python bench/staging_copy_ab.py [--experts 60] [--threads 8] [--slots pool] [--busy none|mlx] [--dir DIR]
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import engine  # noqa: F401  (before mlx: the fast BLAS, see engine.fast_blas)
import mlx.core as mx
import numpy as np

from engine.storage import expert_store
from engine.storage.expert_store import ExpertStore
from engine.model.expert_cache import SlotPool
from engine.storage.expert_layout import ExpertParam
from engine.storage.packed_layout import PackedLayer, aligned

EXPERT_BYTES = 7_077_888
PARAM_BYTES = [2 << 20, 128 << 10, 128 << 10] * 3  # weight, scales, biases of three projections


def copy_holding_gil(staging: Any, dests: list[memoryview]) -> None:
    """The earlier copy: memoryview slice assignment (a memcpy under the GIL)."""
    pos = 0
    for d in dests:
        d[:] = memoryview(staging)[pos : pos + d.nbytes]
        pos += d.nbytes


def slot_buffers(kind: str, k: int) -> tuple[list[list[Any]], Any]:
    """``k`` experts' destinations of nine parameters each, and what keeps them alive."""
    if kind == "numpy":
        return [[np.empty(n, np.uint8) for n in PARAM_BYTES] for _ in range(k)], None
    if kind == "aligned":
        maps = [[mmap.mmap(-1, n) for n in PARAM_BYTES] for _ in range(k)]
        return [[np.frombuffer(m, np.uint8) for m in row] for row in maps], maps
    names = [f"{proj}.{part}" for proj in ("gate_proj", "up_proj", "down_proj") for part in ("weight", "scales", "biases")]
    params = [ExpertParam(name, "U8", (n,), n) for name, n in zip(names, PARAM_BYTES)]
    pool = SlotPool(params, k)
    pool.prefer_host()  # as a streaming pool (CUDA; nothing elsewhere)
    return [pool.dests(s) for s in range(k)], pool


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=60)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--busy", choices=["none", "mlx"], default="none")
    p.add_argument("--slots", choices=["pool", "aligned", "numpy"], default="pool")
    p.add_argument("--dir", default=".")
    args = p.parse_args()
    copies: dict[str, Callable[[Any, list[memoryview]], None]] = {
        "direct": expert_store._copy_out, "numpy": expert_store._copy_out, "memoryview": copy_holding_gil,
    }
    a = mx.random.normal((256, 256))
    mx.eval(a)
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="moebar-copy-ab-") as tmp:
        path = Path(tmp) / "experts.bin"
        stride, sums = aligned(EXPERT_BYTES), []
        with open(path, "wb") as f:
            for _ in range(args.experts):
                blob = os.urandom(EXPERT_BYTES)
                sums.append(zlib.crc32(blob))
                f.write(blob + bytes(stride - EXPERT_BYTES))
            os.fsync(f.fileno())
        layer = PackedLayer(path, stride, EXPERT_BYTES, tuple(sums))
        slots, keep = slot_buffers(args.slots, args.k)
        starts = [np.frombuffer(memoryview(d).cast("B"), np.uint8).ctypes.data for row in slots for d in row]
        print(f"slots: {args.slots}, {sum(a % mmap.PAGESIZE == 0 for a in starts)} of {len(starts)} destinations "
              f"page-aligned (the others are staged), on {mx.default_device()}")  # fmt: skip
        for piece in (0, 1 << 20):
            rates: dict[str, list[float]] = {name: [] for name in copies}
            work: dict[str, float] = {name: 0.0 for name in copies}
            waited: dict[str, float] = {name: 0.0 for name in copies}
            for r in range(args.rounds):
                for name in list(copies) if r % 2 == 0 else list(copies)[::-1]:
                    expert_store._copy_out = copies[name]  # type: ignore[assignment]
                    store = ExpertStore([], packed=[layer], cold=True, io_threads=args.threads, verify="never",
                                        piece_bytes=piece)  # fmt: skip
                    store.direct_into_dests = name == "direct"
                    if not store._use_direct:
                        store.close()
                        print("this filesystem refuses O_DIRECT: nothing to compare")
                        return 1
                    total, elapsed = 0, 0.0
                    try:
                        for s in range(0, args.experts - args.k + 1, args.k):
                            t0 = time.perf_counter()
                            futures = [store.submit(0, e, slots[i]) for i, e in enumerate(range(s, s + args.k))]
                            while args.busy == "mlx" and not all(f.done() for f in futures):
                                mx.eval(a @ a)
                                work[name] += 1
                            total += sum(f.result() for f in futures)
                            elapsed += time.perf_counter() - t0
                    finally:
                        store.close()
                        expert_store._copy_out = copies["numpy"]  # type: ignore[assignment]
                    if name == "direct" and not store.direct_into_dests:
                        print("the slots refused O_DIRECT reads: 'direct' was staged")
                    rates[name].append(total / elapsed / 1e9)
                    waited[name] += elapsed
            label = "whole" if piece == 0 else "1 MiB pieces"
            for name in copies:
                extra = f", main thread {work[name] / waited[name]:.0f} matmuls/s" if args.busy == "mlx" else ""
                print(f"{label:13s} {name:10s} {statistics.median(rates[name]):.3f} GB/s "
                      f"({', '.join(f'{x:.2f}' for x in rates[name])}){extra}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
