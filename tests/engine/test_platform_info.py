"""engine.platform_info: memory pressure, disk counters, RSS, cache bypass and cold read speed."""

from __future__ import annotations

import mmap
import os
import resource
import sys
import types
from collections import namedtuple
from pathlib import Path
from typing import Any

import psutil
import pytest

from engine import platform_info as pi
from engine.errors import MissingFileError, RequestError

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux-specific probe")
Part = namedtuple("Part", "device mountpoint fstype opts")
Counters = namedtuple("Counters", "read_count write_count read_bytes write_bytes read_time write_time")


def _write_file(path: Path, size: int) -> Path:
    """A file of random bytes, flushed to disk so that its pages can be evicted."""
    with open(path, "wb") as f:
        remaining = size
        while remaining:
            n = min(remaining, 8 << 20)
            f.write(os.urandom(n))
            remaining -= n
        f.flush()
        os.fsync(f.fileno())
    return path


# --- memory pressure --------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "level"), [(1, "normal"), (2, "warning"), (4, "critical"), (3, "warning")])
def test_macos_pressure_levels(raw: int, level: str) -> None:
    asked: list[str] = []

    def fake_sysctl(name: str) -> int:
        asked.append(name)
        return raw

    reading = pi.macos_memory_pressure(fake_sysctl)
    assert asked == ["kern.memorystatus_vm_pressure_level"]
    assert (reading.level, reading.raw, reading.source) == (level, float(raw), asked[0])


@pytest.mark.skipif(sys.platform != "darwin", reason="sysctlbyname of this name exists on macOS only")
def test_real_macos_sysctl() -> None:
    assert pi.sysctl_int(pi.MACOS_PRESSURE_SYSCTL) in (1, 2, 4)


class _FakeLibc:
    """Stands in for libc's sysctlbyname: fills the int the caller passed by reference."""

    def __init__(self, value: int, rc: int = 0) -> None:
        self.value, self.rc = value, rc
        self.names: list[bytes] = []

    def sysctlbyname(self, name: bytes, valp: Any, sizep: Any, newp: Any, newlen: Any) -> int:
        import ctypes

        self.names.append(name)
        assert sizep._obj.value == ctypes.sizeof(ctypes.c_int) and newp is None
        if self.rc != 0:
            ctypes.set_errno(2)
            return self.rc
        valp._obj.value = self.value
        return 0


def test_sysctl_int_through_ctypes(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _FakeLibc(4)
    monkeypatch.setattr(pi, "_libc", lambda: fake)
    assert pi.sysctl_int("kern.memorystatus_vm_pressure_level") == 4
    assert fake.names == [b"kern.memorystatus_vm_pressure_level"]
    assert pi.macos_memory_pressure().level == "critical"
    monkeypatch.setattr(pi, "_libc", lambda: _FakeLibc(0, rc=-1))
    with pytest.raises(OSError, match="sysctlbyname\\(kern.nope\\) failed"):
        pi.sysctl_int("kern.nope")


def test_parse_psi_and_thresholds() -> None:
    text = "some avg10=12.50 avg60=3.00 avg300=1.00 total=12345\nfull avg10=0.50 avg60=0.10 avg300=0.00 total=99\n"
    psi = pi.parse_psi(text)
    assert psi["some"]["avg10"] == 12.5 and psi["full"]["total"] == 99
    warning = pi.pressure_from_psi(psi)
    assert warning.level == "warning" and warning.raw == 0.5 and "some avg10=12.50%" in warning.detail
    assert pi.pressure_from_psi(pi.parse_psi("some avg10=1.0\nfull avg10=0.0")).level == "normal"
    assert pi.pressure_from_psi(pi.parse_psi("some avg10=1.0\nfull avg10=2.0")).level == "warning"
    assert pi.pressure_from_psi(pi.parse_psi("some avg10=45.0\nfull avg10=0.0")).level == "critical"
    assert pi.pressure_from_psi(pi.parse_psi("some avg10=5.0\nfull avg10=10.0")).level == "critical"
    with pytest.raises(ValueError):
        pi.parse_psi("garbage")


def test_available_fraction_fallback(tmp_path: Path) -> None:
    assert pi.pressure_from_available(50, 100).level == "normal"
    assert pi.pressure_from_available(10, 100).level == "warning"
    assert pi.pressure_from_available(4, 100).level == "critical"
    missing = pi.linux_memory_pressure(tmp_path / "no-psi")
    assert missing.source == "psutil.virtual_memory" and 0.0 < missing.raw <= 1.0
    (tmp_path / "psi").write_text("some avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert pi.linux_memory_pressure(tmp_path / "psi").source == str(tmp_path / "psi")


@linux_only
def test_memory_pressure_on_this_machine() -> None:
    reading = pi.memory_pressure()
    assert reading.level in ("normal", "warning", "critical")
    expected = str(pi.PSI_PATH) if pi.PSI_PATH.exists() else "psutil.virtual_memory"
    assert reading.source == expected


# --- RAM and RSS ------------------------------------------------------------------------------


def test_memory_and_rss_figures() -> None:
    info = pi.memory_info()
    assert 0 < info.available_bytes <= info.total_bytes
    rss = pi.process_rss_bytes()
    assert 1 << 20 < rss < info.total_bytes
    before = pi.peak_rss_bytes()
    block = bytearray(64 << 20)  # touch 64 MiB: the peak must grow past the old RSS
    block[:: 4096] = b"\1" * len(block[:: 4096])
    assert pi.peak_rss_bytes() >= max(before, pi.process_rss_bytes()) - (8 << 20)
    assert pi.peak_rss_bytes() >= 64 << 20
    del block


def test_maxrss_units() -> None:
    assert pi.maxrss_to_bytes(1000, "linux") == 1_024_000
    assert pi.maxrss_to_bytes(1000, "darwin") == 1000


def test_peak_rss_prefers_vmhwm_and_falls_back_to_getrusage(tmp_path: Path) -> None:
    status = tmp_path / "status"
    status.write_text("Name:\tpython\nVmPeak:\t  900000 kB\nVmHWM:\t  123456 kB\nVmRSS:\t  100000 kB\n")
    assert pi.peak_rss_bytes(status_path=status) == 123456 * 1024
    raw = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert pi.peak_rss_bytes(status_path=tmp_path / "absent") == pi.maxrss_to_bytes(raw)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    assert pi.peak_rss_bytes(resource.RUSAGE_CHILDREN, status_path=status) == pi.maxrss_to_bytes(children)


@linux_only
def test_peak_rss_of_an_exec_child_is_its_own(tmp_path: Path) -> None:
    import subprocess

    ballast = bytearray(300 << 20)  # the parent is big at the fork
    ballast[::4096] = b"\1" * len(ballast[::4096])
    code = "from engine.platform_info import peak_rss_bytes; print(peak_rss_bytes())"
    child_peak = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                    cwd=Path(__file__).resolve().parents[2]).stdout)  # fmt: skip
    del ballast
    assert child_peak < 250 << 20


# --- disk counters ----------------------------------------------------------------------------


def test_sysfs_disk_name_for_disk_and_partition(tmp_path: Path) -> None:
    devices = tmp_path / "devices" / "block" / "nvme0n1"
    (devices / "nvme0n1p2").mkdir(parents=True)
    (devices / "nvme0n1p2" / "partition").write_text("2\n")
    (tmp_path / "dev" / "block").mkdir(parents=True)
    (tmp_path / "dev" / "block" / "259:0").symlink_to(devices)
    (tmp_path / "dev" / "block" / "259:2").symlink_to(devices / "nvme0n1p2")
    assert pi.sysfs_disk_name(259, 0, tmp_path) == "nvme0n1"
    assert pi.sysfs_disk_name(259, 2, tmp_path) == "nvme0n1"
    assert pi.sysfs_disk_name(8, 1, tmp_path) is None


def test_mount_source_picks_longest_mount_point(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    inner = tmp_path / "data"
    inner.mkdir()
    mountinfo.write_text(
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
        f"40 27 0:50 / {inner} rw,relatime shared:1 - btrfs /dev/sdb2 rw\n"
        f"41 27 0:51 / {inner}2 rw - tmpfs tmpfs rw\n"
    )
    assert pi.mount_source_of(inner / "x", mountinfo) == "/dev/sdb2"
    assert pi.mount_source_of(tmp_path, mountinfo) == "/dev/vda"
    assert pi.mount_source_of(tmp_path, tmp_path / "absent") is None


def test_macos_disk_of_path_from_partitions(tmp_path: Path) -> None:
    parts = [Part("/dev/disk3s1s1", "/", "apfs", ""), Part("/dev/disk5s2", str(tmp_path), "apfs", "")]
    assert pi.macos_disk_of_path(tmp_path / "model", lambda: parts) == "disk5"
    assert pi.macos_disk_of_path(Path("/usr"), lambda: parts) == "disk3"
    assert pi.macos_disk_of_path(Path("/usr"), lambda: [Part("map auto_home", "/", "autofs", "")]) is None


def test_disk_read_counters_fall_back_to_total(tmp_path: Path) -> None:
    one = Counters(5, 0, 4096, 0, 7, 0)
    total = Counters(9, 0, 8192, 0, 11, 0)

    def counters(perdisk: bool) -> Any:
        return {"sdz": one} if perdisk else total

    got = pi.disk_read_counters(tmp_path, counters, platform="plan9")
    assert got == pi.DiskReadCounters(None, 8192, 9, 11)


@linux_only
def test_disk_read_counters_follow_real_reads(tmp_path: Path) -> None:
    disk = pi.disk_of_path(tmp_path)
    if disk is None or disk not in (psutil.disk_io_counters(perdisk=True) or {}):
        pytest.skip(f"{tmp_path} is not on a block device psutil lists (tmpfs?)")
    assert pi.disk_of_path(tmp_path) == disk
    path = _write_file(tmp_path / "blob", 16 << 20)
    before = pi.disk_read_counters(path)
    assert before.disk == disk
    fd = pi.open_uncached(path)
    try:
        buf = bytearray(16 << 20)
        assert os.preadv(fd, [buf], 0) == 16 << 20
    finally:
        os.close(fd)
    after = pi.disk_read_counters(path)
    assert after.read_bytes - before.read_bytes >= 15 << 20
    assert after.read_count > before.read_count


# --- cache bypass -----------------------------------------------------------------------------


def test_macos_nocache_uses_f_nocache(tmp_path: Path) -> None:
    calls: list[tuple[int, int, int]] = []
    path = _write_file(tmp_path / "f", 4096)
    fd = pi.open_uncached(path, platform="darwin", fcntl_fn=lambda fd, cmd, arg: calls.append((fd, cmd, arg)))
    try:
        assert calls == [(fd, 48, 1), (fd, 45, 0)]
        assert os.pread(fd, 10, 0) == path.read_bytes()[:10]
    finally:
        os.close(fd)


def test_drop_file_cache_calls_fadvise_dontneed() -> None:
    calls: list[tuple[int, int, int, int]] = []
    assert pi.drop_file_cache(7, 4096, 8192, fadvise=lambda *a: calls.append(a)) is True
    assert calls == [(7, 4096, 8192, os.POSIX_FADV_DONTNEED)]


def test_open_uncached_missing_file(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="nope"):
        pi.open_uncached(tmp_path / "nope")


def _cached_pages(path: Path) -> int:
    """Pages of path in the page cache, via mmap(2) + mincore(2) (Linux)."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    size = path.stat().st_size
    pages = -(-size // mmap.PAGESIZE)
    vec = (ctypes.c_ubyte * pages)()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert addr not in (None, ctypes.c_void_p(-1).value), os.strerror(ctypes.get_errno())
        try:
            rc = libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec)
            assert rc == 0, os.strerror(ctypes.get_errno())
        finally:
            libc.munmap(ctypes.c_void_p(addr), ctypes.c_size_t(size))
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec)


@linux_only
def test_drop_file_cache_really_evicts(tmp_path: Path) -> None:
    path = _write_file(tmp_path / "f", 8 << 20)
    path.read_bytes()  # now cached
    if _cached_pages(path) == 0:
        pytest.skip("this filesystem does not keep pages in the page cache")
    fd = os.open(path, os.O_RDONLY)
    try:
        assert pi.drop_file_cache(fd) is True
    finally:
        os.close(fd)
    if pi.disk_of_path(tmp_path) is None:
        pytest.skip("tmpfs-like filesystem: pages cannot be evicted")
    assert _cached_pages(path) < 16


@linux_only
def test_o_direct_support_and_alignment(tmp_path: Path) -> None:
    path = _write_file(tmp_path / "f", 1 << 20)
    assert pi.o_direct_flag() == os.O_DIRECT
    if not pi.supports_o_direct(path):
        pytest.skip("this filesystem refuses O_DIRECT")
    fd = pi.open_direct(path)
    assert fd is not None
    try:
        aligned = mmap.mmap(-1, 8192)
        assert os.preadv(fd, [aligned], 4096) == 8192
        assert bytes(aligned) == path.read_bytes()[4096:12288]
        with pytest.raises(OSError):
            os.preadv(fd, [aligned], 100)  # unaligned offset
    finally:
        os.close(fd)


# --- cold read speed --------------------------------------------------------------------------


def test_plan_read_blocks_are_distinct_and_whole() -> None:
    files = [(Path("a"), 10 * 4096 + 5), (Path("b"), 3 * 4096)]
    blocks = pi.plan_read_blocks(files, 4096, 100 * 4096)
    assert len(blocks) == 13 and len(set(blocks)) == 13
    assert all(off + 4096 <= files[i][1] and off % 4096 == 0 for i, off in blocks)
    assert len(pi.plan_read_blocks(files, 4096, 5 * 4096)) == 5
    assert pi.plan_read_blocks(files, 4096, 5 * 4096) == pi.plan_read_blocks(files, 4096, 5 * 4096)
    assert pi.plan_read_blocks([(Path("c"), 100)], 4096, 4096) == []


def test_measure_cold_read_speed_reads_from_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    model.mkdir()
    for i in range(3):
        _write_file(model / f"shard{i}.safetensors", 12 << 20)
    on_disk = sys.platform.startswith("linux") and pi.disk_of_path(model) in (psutil.disk_io_counters(perdisk=True) or {})
    # a fake clock: the reads take 2.0 s, so the speed is exactly the bytes read / 2
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(pi, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    before = pi.disk_read_counters(model)
    speed = pi.measure_cold_read_speed(model, block_bytes=1 << 20, threads=2, total_bytes=24 << 20)
    after = pi.disk_read_counters(model)
    monkeypatch.undo()
    assert speed == (24 << 20) / 2.0  # 24 whole 1 MiB blocks
    if on_disk:  # the bytes really came from the disk, not from the page cache
        assert after.read_bytes - before.read_bytes >= 20 << 20
    single = pi.measure_cold_read_speed(model / "shard0.safetensors", block_bytes=3 << 20, threads=1, total_bytes=6 << 20)
    assert single > 0


def test_measure_cold_read_speed_errors(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="missing"):
        pi.measure_cold_read_speed(tmp_path / "missing")
    (tmp_path / "small").write_bytes(b"x" * 100)
    with pytest.raises(MissingFileError, match="whole"):
        pi.measure_cold_read_speed(tmp_path / "small", block_bytes=4096)
    with pytest.raises(RequestError, match="threads"):
        pi.measure_cold_read_speed(tmp_path / "small", threads=0)
