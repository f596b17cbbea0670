"""Failures of the page-cache and macOS disk helpers (engine/platform/page_cache.py, macos_disk.py):
each call that fails raises an OSError naming the call and the OS's reason, a mapping is always
unmapped, and odd diskutil answers fall back to what the device name says."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.platform import macos_disk, page_cache


class _Fn:
    """A callable with ``argtypes`` (as a ctypes function has)."""

    def __init__(self, fn: Any) -> None:
        self.fn, self.argtypes = fn, None

    def __call__(self, *args: Any) -> Any:
        return self.fn(*args)


class FailingLib:
    """libc's mmap/msync/munmap/mincore answering as a failing kernel would (errno set)."""

    def __init__(self, fail: str, code: int = errno.ENOMEM) -> None:
        self.fail, self.code = fail, code
        self.unmapped: list[tuple[int, int]] = []
        self.mincore = _Fn(self._mincore)

    def _errno(self) -> None:
        ctypes.set_errno(self.code)

    def mmap(self, *args: Any) -> int | None:
        if self.fail == "mmap":
            self._errno()
            return ctypes.c_void_p(-1).value
        return 0x7000

    def msync(self, *args: Any) -> int:
        if self.fail == "msync":
            self._errno()
            return -1
        return 0

    def munmap(self, addr: int, length: int) -> int:
        self.unmapped.append((addr, length))
        return 0

    def _mincore(self, addr: int, length: int, vec: Any) -> int:
        if self.fail == "mincore":
            self._errno()
            return -1
        for i in range(len(vec)):
            vec[i] = i % 2  # every other page cached
        return 0


def _libc(fail: str, code: int = errno.ENOMEM) -> page_cache._Libc:
    libc = page_cache._Libc.__new__(page_cache._Libc)
    libc.lib = FailingLib(fail, code)  # type: ignore[assignment]
    return libc


def _file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / "f"
    path.write_bytes(b"x" * size)
    return path


def test_a_failing_mmap_is_an_os_error_naming_the_call() -> None:
    libc = _libc("mmap", errno.ENODEV)
    with pytest.raises(OSError, match="mmap failed: No such device") as failed:
        page_cache.msync_invalidate(3, libc=libc, file_size=lambda fd: 10_000)
    assert failed.value.errno == errno.ENODEV


def test_a_failing_msync_still_unmaps() -> None:
    libc = _libc("msync", errno.EBUSY)
    with pytest.raises(OSError, match="msync failed: Device or resource busy"):
        page_cache.msync_invalidate(3, libc=libc, file_size=lambda fd: 10_000)
    assert libc.lib.unmapped == [(0x7000, 10_000)]


def test_nothing_to_invalidate_past_the_end_or_in_an_empty_range() -> None:
    libc = _libc("none")
    assert page_cache.msync_invalidate(3, 20_000, libc=libc, file_size=lambda fd: 10_000) is False
    assert page_cache.msync_invalidate(3, 0, -5, libc=libc, file_size=lambda fd: 10_000) is False
    assert libc.lib.unmapped == []


def test_cached_fraction_counts_resident_pages_and_names_a_mincore_failure(tmp_path: Path) -> None:
    path = _file(tmp_path, 4 * mmap.PAGESIZE)
    assert page_cache.cached_fraction(path, libc=_libc("none")) == 0.5
    failing = _libc("mincore", errno.EINVAL)
    with pytest.raises(OSError, match="mincore failed: Invalid argument"):
        page_cache.cached_fraction(path, libc=failing)
    assert failing.lib.unmapped == [(0x7000, 4 * mmap.PAGESIZE)]  # unmapped, and the file closed
    (tmp_path / "empty").write_bytes(b"")
    assert page_cache.cached_fraction(tmp_path / "empty", libc=_libc("mmap")) == 0.0  # never mapped


def test_cached_fraction_of_a_file_just_read_with_the_real_libc(tmp_path: Path) -> None:
    path = _file(tmp_path, 3 * mmap.PAGESIZE)
    path.read_bytes()
    assert 0.0 <= page_cache.cached_fraction(path) <= 1.0


def test_diskutil_that_hangs_or_answers_a_list_is_an_os_error() -> None:
    def hangs(cmd: list[str], **kw: Any) -> Any:
        raise subprocess.TimeoutExpired(cmd, kw.get("timeout", 10))

    with pytest.raises(OSError, match="diskutil info disk3: Command .* timed out"):
        macos_disk.diskutil_info("disk3", run=hangs)

    def a_list(cmd: list[str], **kw: Any) -> Any:
        import plistlib

        return subprocess.CompletedProcess(cmd, 0, plistlib.dumps(["disk0"]), b"")

    with pytest.raises(OSError, match="diskutil info disk3: not a dictionary"):
        macos_disk.diskutil_info("disk3", run=a_list)


def test_physical_disks_from_store_entries_of_each_shape_and_fallbacks() -> None:
    infos = {
        "/dev/disk3s1": {"APFSPhysicalStores": ["disk0s2", {"DeviceIdentifier": "disk4s2"}, {"Other": 1}, 7]},
        "/dev/disk6s1": {},  # no stores, no container, no parent: the volume's own whole disk
        "weird": {},
    }
    assert macos_disk.macos_physical_disks("/dev/disk3s1", infos.__getitem__) == ["disk0", "disk4"]
    assert macos_disk.macos_physical_disks("/dev/disk6s1", infos.__getitem__) == ["disk6"]
    assert macos_disk.macos_physical_disks("weird", infos.__getitem__) == []


def test_physical_disks_are_asked_of_diskutil_once_per_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(macos_disk, "_physical_cache", {})
    asked: list[str] = []

    def info(device: str) -> dict[str, Any]:
        asked.append(device)
        return {"ParentWholeDisk": "disk2"}

    assert macos_disk.cached_physical_disks("/dev/disk2s1", info) == ["disk2"]
    assert macos_disk.cached_physical_disks("/dev/disk2s1", info) == ["disk2"]
    assert asked == ["/dev/disk2s1"]
