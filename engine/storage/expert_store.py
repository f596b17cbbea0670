"""ExpertStore: reads one expert's bytes from the SSD into caller-owned buffers, in parallel.

Reads use ``os.preadv`` (which releases the GIL) on a pool of I/O threads, straight into the
slot buffers of the expert cache. The unpacked layout costs one read per parameter (nine for a
quantized SwitchGLU expert); the packed layout costs one. Cold mode keeps the OS page cache out
of the way so that the figures are the disk's: ``O_DIRECT`` into an aligned staging buffer for
the packed layout on Linux, ``F_NOCACHE`` on macOS, otherwise ``posix_fadvise(DONTNEED)`` after
each read.
"""

from __future__ import annotations

import mmap
import os
import sys
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from engine.errors import ExpertReadError
from engine.storage.expert_layout import LayerExperts
from engine.platform_info import drop_file_cache, set_macos_nocache
from engine.storage.packed_layout import ALIGNMENT, PackedLayer



def _pread_full(fd: int, buffers: list[memoryview], offset: int, path: Path) -> int:
    """preadv until every buffer is full; a short read (end of file) is an error."""
    want = sum(b.nbytes for b in buffers)
    done = 0
    while done < want:
        # Skip buffers already filled by an earlier partial read.
        skip = done
        bufs: list[memoryview] = []
        for b in buffers:
            if skip >= b.nbytes:
                skip -= b.nbytes
                continue
            bufs.append(b[skip:] if skip else b)
            skip = 0
        try:
            n = os.preadv(fd, bufs, offset + done)
        except OSError as e:  # (EIO on a failing disk): say which file, where
            raise OSError(e.errno, f"{path}: {e.strerror or e} at byte {offset + done}") from e
        if n <= 0:
            raise ExpertReadError(
                f"{path}: short read at byte {offset + done} ({done} of {want} bytes); the file is truncated"
            )
        done += n
    return done


class ExpertStore:
    """Reads experts of streamed layers from safetensors (or the packed layout) on I/O threads."""

    def __init__(
        self,
        layers: Sequence[LayerExperts],
        *,
        io_threads: int = 4,
        cold: bool = False,
        packed: Sequence[PackedLayer] | None = None,
        verify: str = "first",
    ) -> None:
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', not {verify!r}")
        self.layers = list(layers)
        self.packed = list(packed) if packed else None
        self.cold = cold
        self.verify = verify
        self._verified: set[tuple[int, int]] = set()
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.bytes_read = 0
        self.reads = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="moebar-io")
        self._use_direct = cold and self.packed is not None and hasattr(os, "O_DIRECT")
        files = [p.file for p in self.packed] if self.packed else [s.file for l in self.layers for s in l.sources]
        for f in dict.fromkeys(files):
            self._fds[f] = self._open(f)

    def holds(self, layer: int, expert: int) -> bool:
        """Whether this store can read ``expert`` of ``layer`` (a rank's share holds only its own)."""
        return self.packed[layer].holds(expert) if self.packed else True

    @property
    def layout(self) -> str:
        """``packed`` or ``safetensors``: which layout the store reads."""
        return "packed" if self.packed else "safetensors"

    def _open(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        if self.cold:
            if sys.platform == "darwin":
                set_macos_nocache(fd)  # stops new caching, but keeps pages already cached:
            drop_file_cache(fd)  # evict those (msync(MS_INVALIDATE) on macOS, fadvise on Linux)
        if self._use_direct:
            try:
                self._direct_fds[path] = os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self._use_direct = False  # filesystem without O_DIRECT (tmpfs): fall back
        return fd

    def _staging(self, nbytes: int) -> mmap.mmap:
        """A page-aligned per-thread buffer for O_DIRECT reads."""
        buf = getattr(self._local, "staging", None)
        if buf is None or len(buf) < nbytes:
            buf = mmap.mmap(-1, nbytes)
            self._local.staging = buf
        return buf

    def read_into(self, layer: int, expert: int, dests: Sequence[Any]) -> int:
        """Read ``expert`` of ``layer`` into ``dests``, one per parameter; return the bytes read.

        A destination is a uint8 array, or an object with a ``raw`` uint8 array and a ``finish()``
        that converts what was read (see expert_cache.ConvertBuffer).
        """
        views = [memoryview(getattr(d, "raw", d)).cast("B") for d in dests]
        try:
            if self.packed:
                n = self._read_packed(layer, expert, views)
            else:
                n = self._read_unpacked(layer, expert, views)
        except OSError as e:
            raise ExpertReadError(f"layer {layer} expert {expert}: read failed: {e}") from e
        for d in dests:
            if hasattr(d, "finish"):
                d.finish()
        with self._lock:
            self.bytes_read += n
            self.reads += 1
        return n

    def _read_unpacked(self, layer: int, expert: int, views: list[memoryview]) -> int:
        total = 0
        for (path, offset, nbytes), view in zip(self.layers[layer].source_ranges(expert), views):
            fd = self._fds[path]
            total += _pread_full(fd, [view], offset, path)
            if self.cold:
                drop_file_cache(fd, offset, nbytes)  # keep it cold for the next read
        return total

    def _read_packed(self, layer: int, expert: int, views: list[memoryview]) -> int:
        assert self.packed is not None
        pl = self.packed[layer]
        offset = pl.blob_offset(expert)
        direct_fd = self._direct_fds.get(pl.file) if self._use_direct else None
        if direct_fd is not None:
            staging = self._staging(pl.stride)
            _pread_full(direct_fd, [memoryview(staging)[: pl.stride]], offset, pl.file)
            src = np.frombuffer(staging, dtype=np.uint8, count=pl.payload_bytes)
            pos = 0
            for v in views:
                np.frombuffer(v, dtype=np.uint8)[:] = src[pos : pos + v.nbytes]
                pos += v.nbytes
            n = pl.stride
        else:
            fd = self._fds[pl.file]
            n = _pread_full(fd, views, offset, pl.file)
            if self.cold:
                drop_file_cache(fd, offset, pl.stride)
        self._check(layer, expert, views, pl)
        return n

    def _check(self, layer: int, expert: int, views: list[memoryview], pl: PackedLayer) -> None:
        if self.verify == "never" or (self.verify == "first" and (layer, expert) in self._verified):
            return
        crc = 0
        for v in views:
            crc = zlib.crc32(v, crc)
        if crc != pl.checksum(expert):
            fix = ("pack this rank's share again" if pl.ranks > 1
                   else "delete the moebar-packed folder and run `moebar-engine pack` again")
            raise ExpertReadError(
                f"{pl.file}: checksum mismatch for layer {layer} expert {expert} "
                f"(stored {pl.checksum(expert):#010x}, read {crc:#010x}); the packed file is corrupt: {fix}"
            )
        with self._lock:
            self._verified.add((layer, expert))

    def submit(self, layer: int, expert: int, dests: Sequence[Any]) -> "Future[int]":
        """Queue a read on the I/O threads; the future gives the bytes read."""
        return self._pool.submit(self.read_into, layer, expert, dests)

    def drop_page_cache(self) -> None:
        """Evict the store's files from the OS page cache, for cold measurements (see page_cache)."""
        for fd in self._fds.values():
            drop_file_cache(fd)

    def close(self) -> None:
        """Stop the I/O threads and close the files."""
        self._pool.shutdown(wait=True)
        for fd in list(self._fds.values()) + list(self._direct_fds.values()):
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._direct_fds.clear()


__all__ = ["ExpertStore", "ALIGNMENT"]
