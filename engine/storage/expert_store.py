"""ExpertStore: reads one expert's bytes from the SSD into caller-owned buffers, in parallel.

Reads use ``os.preadv`` (which releases the GIL) on a pool of I/O threads, straight into the
slot buffers of the expert cache. The unpacked layout costs one read per parameter (nine for a
quantized SwitchGLU expert); the packed layout costs one. Cold mode keeps the OS page cache out
of the way so that the figures are the disk's: ``O_DIRECT`` into an aligned staging buffer for
the packed layout on Linux (straight into the slots where they are page-aligned, as CUDA's
managed pools may be; else through an aligned staging buffer), ``F_NOCACHE`` on macOS, otherwise
``posix_fadvise(DONTNEED)`` after each read.

An expert's read can be cut into pieces of ``piece_bytes`` (by default 1 MiB for cold reads, or
whole where a load measured that faster: engine.storage.read_choice; none through the page cache:
``piece_bytes_for``) that the I/O threads share: at top-10 on 8 threads whole-expert reads run in two waves, the second with 2
threads busy and 6 idle, and an SSD keeps more requests in flight. The expert is whole (checked,
converted, counted) when its last piece lands.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import sys
import threading
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np

from engine.errors import ExpertReadError
from engine.storage.expert_layout import LayerExperts
from engine.platform_info import advise_random_reads, drop_file_cache, set_macos_nocache
from engine.storage.packed_layout import ALIGNMENT, PackedLayer, aligned

log = logging.getLogger("moebar.engine")

READ_PIECE_BYTES = 1 << 20  # the size of one read past the page cache; 0 reads each expert whole


def piece_bytes_for(read_piece_kb: int | None, cold: bool) -> int:
    """Bytes per read piece: the setting, or by default pieces for cold reads and whole experts otherwise.

    Measured on this project's Linux VM (8 threads, 10 experts of 6.75 MiB at a time): reads past
    the page cache (O_DIRECT) ran 1.2-1.5x faster in 1 MiB pieces; reads through it ran no faster
    from the disk (1.16 against 1.19 GB/s) and slower from the cache (0.77x): more, smaller calls.
    ``moebar-engine selfcheck`` measures all three on the user's disk. A cold load that measures
    the disk keeps whichever of pieces and whole reads is faster there (engine.storage.read_choice).
    """
    if read_piece_kb is not None:
        return read_piece_kb * 1024
    return READ_PIECE_BYTES if cold else 0



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


def _copy_out(staging: mmap.mmap, dests: list[memoryview]) -> None:
    """Copy the front of ``staging`` into ``dests``, laid end to end, without holding the GIL.

    NumPy's copy releases the GIL (a memoryview slice assignment does not), so the I/O threads'
    copies run side by side and the main thread keeps building the graph meanwhile: 8 threads
    copying an expert's 7 MB each under the GIL would run one at a time.
    """
    src = np.frombuffer(staging, dtype=np.uint8)
    pos = 0
    for d in dests:
        np.copyto(np.frombuffer(d, dtype=np.uint8), src[pos : pos + d.nbytes])
        pos += d.nbytes


def _read_failed(layer: int, expert: int, error: OSError) -> ExpertReadError:
    """The error a failed read of ``expert`` of ``layer`` raises (the OS error names the file)."""
    return ExpertReadError(f"layer {layer} expert {expert}: read failed: {error}")


class _Piece(NamedTuple):
    """One read of part of an expert: a file range and the destination slices it fills."""

    fd: int
    path: Path
    offset: int  # in the file
    nbytes: int  # bytes read from the file (a multiple of ALIGNMENT for O_DIRECT)
    dests: list[memoryview]  # where the payload part of the range goes, in order
    direct: bool  # an O_DIRECT read
    staged: bool = False  # (direct) into the thread's aligned staging buffer, then copied to dests


def page_aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialised uint8 buffer starting on a page boundary (an O_DIRECT read lands in it
    without the staging copy)."""
    spare = np.empty(nbytes + mmap.PAGESIZE, dtype=np.uint8)
    start = -spare.ctypes.data % mmap.PAGESIZE
    return spare[start : start + nbytes]


def reads_land_directly(dests: Sequence[Any]) -> bool:
    """Whether cold reads into these destinations (one expert's) skip the staging copy."""
    views = ExpertStore._views(dests)
    return _page_aligned(views, sum(v.nbytes for v in views))


def _page_aligned(views: list[memoryview], nbytes: int) -> bool:
    """Whether an ``O_DIRECT`` read of ``nbytes`` may land in ``views`` as they are: they cover it
    exactly, and each starts and ends on a page boundary."""
    if sum(v.nbytes for v in views) != nbytes:
        return False
    return all(v.nbytes % mmap.PAGESIZE == 0 and np.frombuffer(v, np.uint8).ctypes.data % mmap.PAGESIZE == 0
               for v in views)  # fmt: skip


def _slices(views: Sequence[memoryview], start: int, end: int) -> list[memoryview]:
    """The parts of ``views`` (laid end to end) that cover bytes [start, end)."""
    out: list[memoryview] = []
    pos = 0
    for v in views:
        lo, hi = max(start, pos), min(end, pos + v.nbytes)
        if lo < hi:
            out.append(v[lo - pos : hi - pos])
        pos += v.nbytes
    return out


class _Gather:
    """One expert's read in flight: its pieces still out, the first error, where it goes."""

    def __init__(self, pieces: int, layer: int, expert: int, views: list[memoryview], dests: Sequence[Any],
                 outer: "Future[int]") -> None:  # fmt: skip
        self.left = pieces
        self.bytes = 0
        self.error: BaseException | None = None
        self.lock = threading.Lock()
        self.layer, self.expert, self.views, self.dests, self.outer = layer, expert, views, dests, outer


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
        piece_bytes: int | None = None,
    ) -> None:
        piece_bytes = piece_bytes_for(None, cold) if piece_bytes is None else piece_bytes
        if piece_bytes < 0:
            raise ValueError(f"piece_bytes must be >= 0 (0 reads each expert whole), not {piece_bytes}")
        if verify not in ("first", "always", "never"):
            raise ValueError(f"verify must be 'first', 'always' or 'never', not {verify!r}")
        self.layers = list(layers)
        self.packed = list(packed) if packed else None
        self.cold = cold
        self.verify = verify
        self.piece_bytes = piece_bytes
        self._verified: set[tuple[int, int]] = set()
        self._fds: dict[Path, int] = {}
        self._direct_fds: dict[Path, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()
        self.bytes_read = 0
        self.reads = 0
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="moebar-io")
        self._use_direct = cold and self.packed is not None and hasattr(os, "O_DIRECT")
        # O_DIRECT reads straight into page-aligned destinations (no staging copy); turned off for
        # good if the kernel refuses that memory (EFAULT, EINVAL)
        self.direct_into_dests = True
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
        try:
            advise_random_reads(fd)  # whole experts at random offsets: read-ahead only reads past them
        except OSError:
            pass  # (a filesystem without the advice reads as before)
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
        that converts what was read (see expert_cache.ConvertBuffer). The pieces are read one
        after another on the calling thread; ``submit`` spreads them over the I/O threads.
        """
        views = self._views(dests)
        try:
            n = sum(self._read_piece(p) for p in self._plan(layer, expert, views))
        except OSError as e:
            raise _read_failed(layer, expert, e) from e
        self._complete(layer, expert, views, dests, n)
        return n

    @staticmethod
    def _views(dests: Sequence[Any]) -> list[memoryview]:
        return [memoryview(getattr(d, "raw", d)).cast("B") for d in dests]

    def _plan(self, layer: int, expert: int, views: list[memoryview]) -> list[_Piece]:
        """Cut the expert's read into pieces of about ``piece_bytes`` (aligned where O_DIRECT reads)."""
        if self.packed:
            pl = self.packed[layer]
            base = pl.blob_offset(expert)
            payload = sum(v.nbytes for v in views)
            direct_fd = self._direct_fds.get(pl.file) if self._use_direct else None
            if direct_fd is not None:  # whole aligned blocks, the payload's padding included
                span = min(aligned(payload), pl.stride)
                step = aligned(self.piece_bytes) if self.piece_bytes else span
                pieces = []
                for s in range(0, span, step):
                    n, dests = min(step, span - s), _slices(views, s, min(s + step, payload))
                    staged = not (self.direct_into_dests and _page_aligned(dests, n))
                    pieces.append(_Piece(direct_fd, pl.file, base + s, n, dests, True, staged))
                return pieces
            step = self.piece_bytes or max(1, payload)
            fd = self._fds[pl.file]
            return [_Piece(fd, pl.file, base + s, min(step, payload - s), _slices(views, s, s + step), False)
                    for s in range(0, payload, step)]  # fmt: skip
        pieces = []
        for (path, offset, nbytes), view in zip(self.layers[layer].source_ranges(expert), views):
            step = self.piece_bytes or max(1, nbytes)
            fd = self._fds[path]
            pieces += [_Piece(fd, path, offset + s, min(step, nbytes - s), [view[s : s + step]], False)
                       for s in range(0, nbytes, step)]  # fmt: skip
        return pieces

    def _read_piece(self, piece: _Piece) -> int:
        """Read one piece into its destinations; return the bytes read from the file."""
        if piece.direct and not piece.staged and self.direct_into_dests:
            try:
                return _pread_full(piece.fd, piece.dests, piece.offset, piece.path)
            except OSError as e:
                if e.errno not in (errno.EFAULT, errno.EINVAL):
                    raise
                self.direct_into_dests = False  # this memory refuses O_DIRECT: stage every read
                log.info("O_DIRECT reads into the expert slots refused (%s): reading through a staging buffer", e)
        if piece.direct:
            staging = self._staging(piece.nbytes)
            _pread_full(piece.fd, [memoryview(staging)[: piece.nbytes]], piece.offset, piece.path)
            _copy_out(staging, piece.dests)
            return piece.nbytes
        n = _pread_full(piece.fd, piece.dests, piece.offset, piece.path)
        if self.cold:
            drop_file_cache(piece.fd, piece.offset, piece.nbytes)  # keep it cold for the next read
        return n

    def _complete(self, layer: int, expert: int, views: list[memoryview], dests: Sequence[Any], n: int) -> None:
        """Every piece is in: check the payload, convert the buffers that need it, count the read."""
        if self.packed:
            self._check(layer, expert, views, self.packed[layer])
        for d in dests:
            if hasattr(d, "finish"):
                d.finish()
        with self._lock:
            self.bytes_read += n
            self.reads += 1

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
        """Queue a read on the I/O threads; the future gives the bytes read.

        The expert's pieces go to the pool one by one; the future is resolved (with the bytes, or
        the first error as an ExpertReadError) only when every piece has finished, so no thread
        still writes into ``dests`` once it is. Every error comes through the future.
        """
        outer: Future[int] = Future()
        outer.set_running_or_notify_cancel()
        try:
            views = self._views(dests)
            pieces = self._plan(layer, expert, views)
            if not pieces:  # an expert of no bytes
                self._complete(layer, expert, views, dests, 0)
                outer.set_result(0)
                return outer
        except Exception as e:  # (an expert not in this rank's share): reported through the future
            outer.set_exception(e)
            return outer
        gather = _Gather(len(pieces), layer, expert, views, dests, outer)
        for i, piece in enumerate(pieces):
            try:
                future = self._pool.submit(self._read_piece, piece)
            except Exception as e:  # the pool was shut down midway: the pieces not queued fail
                for _ in pieces[i:]:
                    self._settle(gather, e, 0)
                break
            future.add_done_callback(lambda f: self._settle(gather, f.exception(), 0 if f.exception() else f.result()))
        return outer

    def _settle(self, gather: _Gather, error: BaseException | None, nbytes: int) -> None:
        """Count a finished piece; the last one completes the expert and resolves the read's future."""
        with gather.lock:
            if error is not None and gather.error is None:
                gather.error = error
            gather.bytes += nbytes
            gather.left -= 1
            if gather.left:
                return
        try:
            if gather.error is not None:
                e = gather.error
                if isinstance(e, OSError):
                    raise _read_failed(gather.layer, gather.expert, e) from e
                raise e
            self._complete(gather.layer, gather.expert, gather.views, gather.dests, gather.bytes)
        except BaseException as e:
            gather.outer.set_exception(e)
        else:
            gather.outer.set_result(gather.bytes)

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
