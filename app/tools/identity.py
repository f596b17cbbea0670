"""File identity beyond (st_dev, st_ino): an inode number is reused at once after a delete (ext4),
so a new file can take a dropped file's number. The birth (creation) time tells them apart: macOS
reports it in stat, Linux through statx (glibc 2.28+, on ext4, btrfs, xfs, tmpfs...). Where no
birth time can be read, size, modification and change times stand in for it (and then a file
edited after its drop counts as changed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat
import sys
from dataclasses import dataclass

_AT_EMPTY_PATH = 0x1000
_AT_SYMLINK_NOFOLLOW = 0x100
_STATX_BTIME = 0x800
_STATX_SIZE = 256  # struct statx
_BTIME_OFFSET = 80  # stx_btime: {s64 tv_sec; u32 tv_nsec; s32 reserved}


def _load_statx() -> object | None:
    """glibc's statx, loaded once at import (never while a tool runs); None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.statx
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    function.restype = ctypes.c_int
    return function


_statx = _load_statx()


def _statx_birth_ns(dir_fd: int, path: bytes, flags: int) -> int | None:
    if _statx is None:
        return None
    buffer = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(dir_fd, path, flags, _STATX_BTIME, buffer) != 0:  # type: ignore[operator]
        return None
    mask = int.from_bytes(buffer.raw[0:4], sys.byteorder)
    if not mask & _STATX_BTIME:
        return None  # the file system keeps no birth time
    seconds = int.from_bytes(buffer.raw[_BTIME_OFFSET:_BTIME_OFFSET + 8], sys.byteorder, signed=True)
    nanoseconds = int.from_bytes(buffer.raw[_BTIME_OFFSET + 8:_BTIME_OFFSET + 12], sys.byteorder)
    return seconds * 1_000_000_000 + nanoseconds


def _stat_birth_ns(info: os.stat_result) -> int | None:
    exact = getattr(info, "st_birthtime_ns", None)
    if isinstance(exact, int):
        return exact
    rough = getattr(info, "st_birthtime", None)
    return round(rough * 1e9) if isinstance(rough, (int, float)) else None


def birth_time_of_fd(fd: int) -> int | None:
    """Creation time (ns) of an open file, or None where the platform or file system has none."""
    if _statx is None:
        return _stat_birth_ns(os.fstat(fd))
    return _statx_birth_ns(fd, b"", _AT_EMPTY_PATH)


def birth_time_at(path: str | bytes, dir_fd: int | None = None) -> int | None:
    """Creation time (ns) of `path` (relative to `dir_fd` if given), not following a final symlink."""
    if _statx is None:
        try:
            return _stat_birth_ns(os.stat(path, dir_fd=dir_fd, follow_symlinks=False))
        except OSError:
            return None
    raw = os.fsencode(path)
    if b"\x00" in raw:
        return None
    return _statx_birth_ns(-100 if dir_fd is None else dir_fd, raw, _AT_SYMLINK_NOFOLLOW)  # -100: AT_FDCWD


@dataclass(frozen=True)
class FileIdentity:
    """What says "the same file": device, inode, birth time where known; size and times besides."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    birth_ns: int | None

    @classmethod
    def of(cls, info: os.stat_result, birth_ns: int | None) -> FileIdentity:
        """The identity of a stat result and its birth time (folders get size 0: it says nothing)."""
        size = 0 if stat.S_ISDIR(info.st_mode) else info.st_size
        return cls(info.st_dev, info.st_ino, size, info.st_mtime_ns, info.st_ctime_ns, birth_ns)

    def differs_from(self, info: os.stat_result, birth_ns: int | None, contents_may_change: bool = False) -> str | None:
        """None if (`info`, `birth_ns`) is this file; otherwise how it differs.

        With birth times on both sides, they decide (an edited file is still the same file).
        Without, the size and times must be unchanged too, unless `contents_may_change` (folders,
        whose times move with every file added inside).
        """
        if (info.st_dev, info.st_ino) != (self.device, self.inode):
            return "it is not the same file on disk any more"
        if self.birth_ns is not None and birth_ns is not None:
            return None if birth_ns == self.birth_ns else "a new file took its place"
        if contents_may_change:
            return None
        now = FileIdentity.of(info, birth_ns)
        if (now.size, now.mtime_ns, now.ctime_ns) != (self.size, self.mtime_ns, self.ctime_ns):
            return "it changed (size or times) or a new file took its place"
        return None
