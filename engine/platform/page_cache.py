"""Evicting a file's pages from the OS page cache, for honest cold reads.

Linux: ``posix_fadvise(POSIX_FADV_DONTNEED)``. macOS has no fadvise, and ``F_NOCACHE`` only stops
new caching: pages already cached stay. There, the file is mapped and ``msync(MS_INVALIDATE)``
drops its cached pages (fio's method on macOS).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
from collections.abc import Callable

MS_INVALIDATE = 0x2  # the same value on macOS and Linux (sys/mman.h)
METHOD_FADVISE = "posix_fadvise(POSIX_FADV_DONTNEED)"
METHOD_MSYNC = "mmap + msync(MS_INVALIDATE)"
METHOD_NONE = "none (no eviction call on this OS)"


class _Libc:
    """mmap/msync/munmap through ctypes, with errno (Python's mmap has no msync flags)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_longlong]
        libc.msync.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.lib = libc

    def mmap(self, length: int, fd: int, offset: int) -> int:
        """Map ``length`` bytes of fd read-only and shared; return the address."""
        addr = self.lib.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
        if addr is None or addr == ctypes.c_void_p(-1).value:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap failed: {os.strerror(err)}")
        return int(addr)

    def msync(self, addr: int, length: int, flags: int) -> None:
        """msync(2)."""
        if self.lib.msync(addr, length, flags) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"msync failed: {os.strerror(err)}")

    def munmap(self, addr: int, length: int) -> None:
        """munmap(2)."""
        self.lib.munmap(addr, length)


_LIBC: _Libc | None = None


def _libc() -> _Libc:
    global _LIBC
    if _LIBC is None:
        _LIBC = _Libc()
    return _LIBC


def msync_invalidate(fd: int, offset: int = 0, length: int = 0, libc: _Libc | None = None,
                     file_size: Callable[[int], int] | None = None) -> bool:  # fmt: skip
    """Drop fd's cached pages in [offset, offset+length) (0 = to the end) by mmap + msync(MS_INVALIDATE).

    The range is widened to whole pages. Returns False for an empty range.
    """
    calls = libc or _libc()
    size = (file_size or (lambda f: os.fstat(f).st_size))(fd)
    if offset >= size:
        return False
    end = size if length == 0 else min(size, offset + length)
    start = offset - offset % mmap.PAGESIZE
    span = end - start
    if span <= 0:
        return False
    addr = calls.mmap(span, fd, start)
    try:
        calls.msync(addr, span, MS_INVALIDATE)
    finally:
        calls.munmap(addr, span)
    return True


def eviction_method(platform: str = sys.platform) -> str:
    """How this OS's cold reads evict cached pages (reported by the bench and selfcheck)."""
    if platform == "darwin":
        return METHOD_MSYNC
    if hasattr(os, "posix_fadvise") and platform.startswith("linux"):
        return METHOD_FADVISE
    return METHOD_NONE


def cached_fraction(path: str | os.PathLike[str], libc: _Libc | None = None) -> float:
    """Share of the file's pages now in the page cache (mmap + mincore, Linux and macOS)."""
    calls = libc or _libc()
    size = os.path.getsize(path)
    if size == 0:
        return 0.0
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = calls.mmap(size, fd, 0)
        try:
            calls.lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
            if calls.lib.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore failed: {os.strerror(err)}")
        finally:
            calls.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec) / pages
