"""macOS paths of the platform layer, run here through fakes and fixture outputs: the disk gauge's
APFS volume -> physical disk mapping, msync(MS_INVALIDATE) eviction, and RLIMIT_NOFILE."""

from __future__ import annotations

import mmap
import os
import resource
import subprocess
from collections import namedtuple
from pathlib import Path
from typing import Any

import pytest

from engine import platform_info as pi
from engine.platform import limits, macos_disk, page_cache

FIXTURES = Path(__file__).with_name("fixtures") / "macos"
Part = namedtuple("Part", "device mountpoint fstype opts")
# psutil's sdiskio on macOS (read_time/write_time in ms; no busy_time)
Io = namedtuple("Io", "read_count write_count read_bytes write_bytes read_time write_time")


def _diskutil(identifier: str) -> dict[str, Any]:
    """`diskutil info -plist` from the fixture files, through the real plist parsing."""
    ident = identifier.removeprefix("/dev/")
    path = FIXTURES / f"diskutil_info_{ident}.plist"

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        assert cmd == ["/usr/sbin/diskutil", "info", "-plist", identifier]
        if not path.is_file():
            return subprocess.CompletedProcess(cmd, 1, b"", b"Could not find disk")
        return subprocess.CompletedProcess(cmd, 0, path.read_bytes(), b"")

    return macos_disk.diskutil_info(identifier, run=run)


def test_apfs_volume_maps_to_its_physical_disk() -> None:
    assert macos_disk.macos_physical_disks("/dev/disk3s1s1", _diskutil) == ["disk0"]


def test_volume_without_stores_goes_through_its_container_fusion_drive() -> None:
    assert macos_disk.macos_physical_disks("/dev/disk5s1", _diskutil) == ["disk1", "disk2"]


def test_non_apfs_volume_uses_its_parent_whole_disk() -> None:
    assert macos_disk.macos_physical_disks("/dev/disk4s1", _diskutil) == ["disk4"]


def test_diskutil_failure_and_bad_output_are_os_errors() -> None:
    with pytest.raises(OSError, match="exited with 1"):
        _diskutil("disk9s1")

    def garbage(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        return subprocess.CompletedProcess(cmd, 0, b"not a plist", b"")

    with pytest.raises(OSError, match="unreadable plist"):
        macos_disk.diskutil_info("disk3", run=garbage)

    def missing(cmd: list[str], **kw: Any) -> Any:
        raise FileNotFoundError(cmd[0])

    with pytest.raises(OSError, match="diskutil"):
        macos_disk.diskutil_info("disk3", run=missing)


def test_disk_read_counters_follow_the_physical_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parts = [Part("/dev/disk3s1s1", "/", "apfs", ""), Part("/dev/disk5s1", str(tmp_path), "apfs", "")]
    # psutil lists physical disks only: disk0 (internal SSD), disk1 + disk2 (the Fusion pair)
    per_disk = {"disk0": Io(10, 0, 4096, 0, 3, 0), "disk1": Io(5, 0, 1000, 0, 1, 0), "disk2": Io(7, 0, 2000, 0, 2, 0)}

    def counters(perdisk: bool) -> Any:
        return per_disk if perdisk else Io(22, 0, 7096, 0, 6, 0)

    real = pi.macos_counter_disks
    monkeypatch.setattr(pi, "macos_counter_disks",
                        lambda p: real(p, lambda: parts, lambda v: macos_disk.macos_physical_disks(v, _diskutil)))
    got = pi.disk_read_counters(tmp_path / "model", counters, platform="darwin")
    assert got == pi.DiskReadCounters("disk1+disk2", 3000, 12, 3)
    got = pi.disk_read_counters(Path("/usr"), counters, platform="darwin")
    assert got == pi.DiskReadCounters("disk0", 4096, 10, 3)


def test_counter_disks_fall_back_to_the_container_when_diskutil_fails(tmp_path: Path) -> None:
    parts = [Part("/dev/disk3s1s1", "/", "apfs", "")]

    def broken(volume: str) -> list[str]:
        raise OSError("diskutil: not found")

    assert pi.macos_counter_disks(Path("/usr"), lambda: parts, broken) == ["disk3"]
    assert pi.macos_counter_disks(Path("/usr"), lambda: [], broken) == []


# --- eviction ---------------------------------------------------------------------------------


class FakeLibc:
    """Records mmap/msync/munmap calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def mmap(self, length: int, fd: int, offset: int) -> int:
        self.calls.append(("mmap", length, fd, offset))
        return 0x1000

    def msync(self, addr: int, length: int, flags: int) -> None:
        self.calls.append(("msync", addr, length, flags))

    def munmap(self, addr: int, length: int) -> None:
        self.calls.append(("munmap", addr, length))


def test_msync_invalidate_maps_whole_pages_and_unmaps() -> None:
    fake = FakeLibc()
    page = mmap.PAGESIZE
    size = 10 * page + 5
    assert page_cache.msync_invalidate(7, page + 100, 3 * page, libc=fake, file_size=lambda fd: size)  # type: ignore[arg-type]
    start = page  # offset rounded down to a page
    assert fake.calls == [("mmap", page + 100 + 3 * page - start, 7, start), ("msync", 0x1000, 3 * page + 100, 2),
                          ("munmap", 0x1000, 3 * page + 100)]
    fake.calls.clear()
    assert page_cache.msync_invalidate(7, libc=fake, file_size=lambda fd: size)  # type: ignore[arg-type]
    assert fake.calls[0] == ("mmap", size, 7, 0)
    fake.calls.clear()
    assert not page_cache.msync_invalidate(7, size, 0, libc=fake, file_size=lambda fd: size)  # type: ignore[arg-type]
    assert fake.calls == []


def test_drop_file_cache_on_macos_uses_msync_not_fadvise() -> None:
    seen: list[tuple[int, int, int]] = []

    def evict(fd: int, offset: int, length: int) -> bool:
        seen.append((fd, offset, length))
        return True

    assert pi.drop_file_cache(5, 4096, 8192, platform="darwin", msync_evict=evict) is True
    assert seen == [(5, 4096, 8192)]
    assert page_cache.eviction_method("darwin") == "mmap + msync(MS_INVALIDATE)"
    assert page_cache.eviction_method("linux") == "posix_fadvise(POSIX_FADV_DONTNEED)"
    assert page_cache.eviction_method("win32").startswith("none")


def test_msync_invalidate_real_calls_succeed(tmp_path: Path) -> None:
    """The real libc path (mmap, msync(MS_INVALIDATE), munmap) runs without error on this OS."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(3 * mmap.PAGESIZE + 17))
    fd = os.open(path, os.O_RDONLY)
    try:
        assert page_cache.msync_invalidate(fd) is True
        assert page_cache.msync_invalidate(fd, mmap.PAGESIZE + 1, 10) is True
        assert os.pread(fd, 4, 0) == path.read_bytes()[:4]  # the file is intact
    finally:
        os.close(fd)


# --- open-files limit -------------------------------------------------------------------------


def _limits(soft: int, hard: int) -> tuple[Any, list[tuple[int, int]]]:
    sets: list[tuple[int, int]] = []
    return (lambda what: (soft, hard)), sets


@pytest.mark.parametrize(
    "soft, hard, needed, platform, want",
    [
        (256, 10_000, 100, "darwin", 256),  # enough already: untouched
        (256, resource.RLIM_INFINITY, 5000, "darwin", 5000),
        (256, resource.RLIM_INFINITY, 50_000, "darwin", limits.MACOS_OPEN_MAX),  # macOS caps at OPEN_MAX
        (1024, 4096, 50_000, "linux", 4096),  # up to the hard limit
        (1024, 1024, 5000, "linux", 1024),  # nothing to gain
    ],
)
def test_open_files_limit_is_raised_within_the_hard_limit(soft: int, hard: int, needed: int, platform: str, want: int) -> None:
    sets: list[tuple[int, int]] = []
    got = limits.raise_open_files_limit(
        needed, getrlimit=lambda what: (soft, hard), setrlimit=lambda what, v: sets.append(v), platform=platform
    )
    assert got == want
    assert sets == ([] if want == soft else [(want, hard)])


def test_open_files_limit_refused_keeps_the_old_one() -> None:
    def refuse(what: int, value: tuple[int, int]) -> None:
        raise ValueError("not allowed")

    assert limits.raise_open_files_limit(5000, getrlimit=lambda w: (256, 9000), setrlimit=refuse) == 256


def test_open_files_limit_really_raised_here() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(soft + 16, hard) if hard != resource.RLIM_INFINITY else soft + 16
    try:
        assert limits.raise_open_files_limit(want) == want
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
