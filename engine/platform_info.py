"""Small platform probes for the gauges and the memory plan: memory pressure, disk read counters,
RAM and RSS, page-cache bypass for cold reads, and a cold read-speed measurement.

Each OS-specific step is its own small function taking the OS call as a parameter, so the macOS
paths can be tested on Linux with only that call replaced.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import random
import re
import resource
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import psutil

from engine.errors import ExpertReadError, MissingFileError, RequestError
from engine.platform.limits import raise_open_files_limit as raise_open_files_limit  # re-exported
from engine.platform.macos_disk import cached_physical_disks
from engine.platform.page_cache import eviction_method as eviction_method  # re-exported
from engine.platform.page_cache import msync_invalidate

PressureLevel = Literal["normal", "warning", "critical"]

# macOS kern.memorystatus_vm_pressure_level values (sys/kern_memorystatus.h).
MACOS_PRESSURE_LEVELS: dict[int, PressureLevel] = {1: "normal", 2: "warning", 4: "critical"}
MACOS_PRESSURE_SYSCTL = "kern.memorystatus_vm_pressure_level"
# Linux PSI thresholds, in percent of wall time over the last 10 s ("avg10"). "some": at least
# one task stalled waiting for memory (reclaim, refaults, swap-in); "full": all non-idle tasks
# stalled at once, i.e. the machine made no progress. A sustained "full" share of a few percent
# is already felt by the user; "some" tolerates more because one stalled reader is common.
PSI_WARNING = {"some": 10.0, "full": 2.0}
PSI_CRITICAL = {"some": 40.0, "full": 10.0}
PSI_PATH = Path("/proc/pressure/memory")
# Fallback when PSI is absent: fraction of RAM still available (psutil "available").
AVAILABLE_WARNING = 0.15
AVAILABLE_CRITICAL = 0.05
F_NOCACHE = 48  # macOS fcntl: do not keep this file's data in the unified buffer cache
F_RDAHEAD = 45  # macOS fcntl: turn read-ahead on/off
DIRECT_ALIGN = 4096  # O_DIRECT offsets, lengths and buffers are aligned to this


# --- memory pressure --------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPressure:
    """A memory-pressure reading: a colour-ready level, the raw reading and where it came from."""

    level: PressureLevel
    raw: float  # macOS level (1/2/4), PSI "full avg10" percent, or available fraction of RAM
    source: str  # the sysctl name, the PSI file, or "psutil.virtual_memory"
    detail: str = ""


def _libc() -> ctypes.CDLL:
    """The C library, loaded with errno support."""
    return ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def sysctl_int(name: str) -> int:
    """Read an integer sysctl by name with sysctlbyname(3) (macOS/BSD)."""
    libc = _libc()
    value = ctypes.c_int(0)
    size = ctypes.c_size_t(ctypes.sizeof(value))
    rc = libc.sysctlbyname(name.encode(), ctypes.byref(value), ctypes.byref(size), None, ctypes.c_size_t(0))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"sysctlbyname({name}) failed: {os.strerror(err)}")
    return value.value


def macos_memory_pressure(sysctl: Callable[[str], int] = sysctl_int) -> MemoryPressure:
    """Memory pressure from macOS's kern.memorystatus_vm_pressure_level (1, 2 or 4)."""
    raw = sysctl(MACOS_PRESSURE_SYSCTL)
    level = MACOS_PRESSURE_LEVELS.get(raw)
    if level is None:  # unknown value: the highest level it reaches
        level = "critical" if raw >= 4 else "warning" if raw >= 2 else "normal"
    return MemoryPressure(level, float(raw), MACOS_PRESSURE_SYSCTL)


def parse_psi(text: str) -> dict[str, dict[str, float]]:
    """Parse a /proc/pressure/* file into {"some": {"avg10": ..}, "full": {..}}."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        kind, _, fields = line.strip().partition(" ")
        if kind not in ("some", "full"):
            continue
        values: dict[str, float] = {}
        for item in fields.split():
            key, sep, value = item.partition("=")
            if sep:
                values[key] = float(value)
        out[kind] = values
    if "some" not in out:
        raise ValueError("no 'some' line in PSI text")
    return out


def pressure_from_psi(psi: dict[str, dict[str, float]], source: str = str(PSI_PATH)) -> MemoryPressure:
    """Classify PSI avg10 figures with PSI_WARNING / PSI_CRITICAL (percent of time stalled)."""
    some = psi.get("some", {}).get("avg10", 0.0)
    full = psi.get("full", {}).get("avg10", 0.0)
    level: PressureLevel = "normal"
    if some >= PSI_CRITICAL["some"] or full >= PSI_CRITICAL["full"]:
        level = "critical"
    elif some >= PSI_WARNING["some"] or full >= PSI_WARNING["full"]:
        level = "warning"
    return MemoryPressure(level, full, source, f"some avg10={some:.2f}% full avg10={full:.2f}%")


def pressure_from_available(available: int, total: int) -> MemoryPressure:
    """Classify the available fraction of RAM (the fallback when PSI is absent)."""
    fraction = available / total if total > 0 else 0.0
    level: PressureLevel = "normal"
    if fraction < AVAILABLE_CRITICAL:
        level = "critical"
    elif fraction < AVAILABLE_WARNING:
        level = "warning"
    return MemoryPressure(level, fraction, "psutil.virtual_memory", f"{fraction:.1%} of RAM available")


def linux_memory_pressure(psi_path: Path = PSI_PATH) -> MemoryPressure:
    """Memory pressure from Linux PSI, or from available RAM when PSI is absent or unreadable."""
    try:
        return pressure_from_psi(parse_psi(psi_path.read_text()), str(psi_path))
    except (OSError, ValueError):
        vm = psutil.virtual_memory()
        return pressure_from_available(int(vm.available), int(vm.total))


def memory_pressure(platform: str = sys.platform) -> MemoryPressure:
    """Current memory pressure on this OS."""
    if platform == "darwin":
        try:
            return macos_memory_pressure()
        except OSError:
            vm = psutil.virtual_memory()
            return pressure_from_available(int(vm.available), int(vm.total))
    return linux_memory_pressure()


# --- RAM and RSS ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryInfo:
    """Machine RAM in bytes."""

    total_bytes: int
    available_bytes: int


def memory_info() -> MemoryInfo:
    """Total and available RAM (psutil's "available": free plus reclaimable cache)."""
    vm = psutil.virtual_memory()
    return MemoryInfo(int(vm.total), int(vm.available))


def process_rss_bytes(pid: int | None = None) -> int:
    """Resident set size of a process (default: this one), in bytes."""
    return int(psutil.Process(pid).memory_info().rss)


def maxrss_to_bytes(ru_maxrss: int, platform: str = sys.platform) -> int:
    """Convert getrusage's ru_maxrss to bytes: it is KiB on Linux and bytes on macOS."""
    return int(ru_maxrss) if platform == "darwin" else int(ru_maxrss) * 1024


def peak_rss_bytes(who: int = resource.RUSAGE_SELF, status_path: Path = Path("/proc/self/status")) -> int:
    """Peak resident set size of this process (or RUSAGE_CHILDREN), in bytes.

    On Linux, ru_maxrss of a process started by fork+exec includes the parent's RSS at the fork,
    so this process's own peak is read from VmHWM in /proc/self/status when it is there.
    """
    if who == resource.RUSAGE_SELF and status_path.is_file():
        for line in status_path.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return maxrss_to_bytes(resource.getrusage(who).ru_maxrss)


# --- disk read counters -----------------------------------------------------------------------


@dataclass(frozen=True)
class DiskReadCounters:
    """Cumulative read counters of one disk (or of all disks when disk is None)."""

    disk: str | None
    read_bytes: int
    read_count: int
    read_time_ms: int


def sysfs_disk_name(major: int, minor: int, sys_root: Path = Path("/sys")) -> str | None:
    """Linux: the whole-disk name (e.g. "nvme0n1", "vda") of a block device number."""
    link = sys_root / "dev" / "block" / f"{major}:{minor}"
    try:
        target = link.resolve(strict=True)
    except OSError:
        return None
    if (target / "partition").exists():  # a partition: its parent directory is the disk
        return target.parent.name
    return target.name


def mount_source_of(path: Path, mountinfo: Path = Path("/proc/self/mountinfo")) -> str | None:
    """Linux: the mount source (e.g. "/dev/sda2") of the longest mount point holding path."""
    try:
        lines = mountinfo.read_text().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best: tuple[int, str] | None = None
    for line in lines:
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        mount_point = fields[4].replace("\\040", " ")
        inside = target == mount_point or target.startswith(mount_point.rstrip("/") + "/")
        if inside and (best is None or len(mount_point) >= best[0]):
            best = (len(mount_point), tail[1])
    return best[1] if best else None


def linux_disk_of_path(path: Path, sys_root: Path = Path("/sys")) -> str | None:
    """Linux: the disk holding path, via st_dev → /sys/dev/block, then via the mount source."""
    st = os.stat(path)
    name = sysfs_disk_name(os.major(st.st_dev), os.minor(st.st_dev), sys_root)
    if name is not None:
        return name
    source = mount_source_of(path)  # btrfs, overlay and others report anonymous st_dev
    if source and source.startswith("/dev/"):
        try:
            rdev = os.stat(source).st_rdev
        except OSError:
            return None
        return sysfs_disk_name(os.major(rdev), os.minor(rdev), sys_root)
    return None


def macos_volume_of_path(path: Path, partitions: Callable[[], list[Any]] = psutil.disk_partitions) -> str | None:
    """macOS: the device ("/dev/disk3s1s1") of the volume holding path, from psutil's partition list."""
    target = str(path.resolve())
    best: tuple[int, str] | None = None
    for part in partitions():
        mp = part.mountpoint
        if (target == mp or target.startswith(mp.rstrip("/") + "/")) and (best is None or len(mp) > best[0]):
            best = (len(mp), part.device)
    if best is None or not best[1].startswith("/dev/disk"):
        return None
    return best[1]


def macos_disk_of_path(path: Path, partitions: Callable[[], list[Any]] = psutil.disk_partitions) -> str | None:
    """macOS: the BSD disk ("disk3") of the volume holding path (an APFS container, not the SSD)."""
    volume = macos_volume_of_path(path, partitions)
    match = re.match(r"/dev/(disk\d+)", volume or "")  # "/dev/disk3s1s1" -> "disk3"
    return match.group(1) if match else None


def macos_counter_disks(path: Path, partitions: Callable[[], list[Any]] = psutil.disk_partitions,
                        physical: Callable[[str], list[str]] = cached_physical_disks) -> list[str]:  # fmt: skip
    """macOS: the physical disks whose read counters move when path is read (APFS store -> disk0)."""
    volume = macos_volume_of_path(path, partitions)
    if volume is None:
        return []
    try:
        return physical(volume)
    except OSError:
        container = macos_disk_of_path(path, partitions)
        return [container] if container else []


def disk_of_path(path: str | Path, platform: str = sys.platform) -> str | None:
    """Name of the disk holding path as psutil names it, or None when it cannot be told."""
    p = Path(path)
    if platform.startswith("linux"):
        return linux_disk_of_path(p)
    if platform == "darwin":
        return macos_disk_of_path(p)
    return None


def disk_read_counters(
    path: str | Path,
    counters: Callable[..., Any] = psutil.disk_io_counters,
    platform: str = sys.platform,
) -> DiskReadCounters:
    """Read counters of the disk holding path; all disks summed when that disk is not listed.

    On macOS the disks are the physical stores of the path's APFS volume (several are summed).
    """
    names = macos_counter_disks(Path(path)) if platform == "darwin" else [disk_of_path(path, platform)]
    per_disk = counters(perdisk=True) or {}
    found = [n for n in names if n is not None and n in per_disk]
    if found:
        picked = [per_disk[n] for n in found]
        return DiskReadCounters(
            "+".join(found),
            sum(int(c.read_bytes) for c in picked),
            sum(int(c.read_count) for c in picked),
            sum(int(c.read_time) for c in picked),
        )
    total = counters(perdisk=False)
    if total is None:
        return DiskReadCounters(None, 0, 0, 0)
    return DiskReadCounters(None, int(total.read_bytes), int(total.read_count), int(total.read_time))


# --- page-cache bypass ------------------------------------------------------------------------


def o_direct_flag() -> int | None:
    """The O_DIRECT open flag, or None where the OS has none (macOS)."""
    flag = getattr(os, "O_DIRECT", None)
    return int(flag) if flag else None


def open_direct(path: str | Path) -> int | None:
    """Open for O_DIRECT reads (aligned buffers, offsets and lengths), or None if unsupported here."""
    flag = o_direct_flag()
    if flag is None:
        return None
    try:
        return os.open(path, os.O_RDONLY | flag)
    except OSError as exc:
        if exc.errno in (errno.EINVAL, errno.EOPNOTSUPP):  # e.g. tmpfs
            return None
        raise


def supports_o_direct(path: str | Path) -> bool:
    """True when path can be opened with O_DIRECT and read into an aligned buffer."""
    fd = open_direct(path)
    if fd is None:
        return False
    try:
        buf = mmap.mmap(-1, DIRECT_ALIGN)
        try:
            os.preadv(fd, [buf], 0)
            return True
        except OSError:
            return False
        finally:
            buf.close()
    finally:
        os.close(fd)


def set_macos_nocache(fd: int, fcntl_fn: Callable[[int, int, int], Any] | None = None) -> None:
    """macOS: turn off caching (F_NOCACHE) and read-ahead (F_RDAHEAD) for fd."""
    if fcntl_fn is None:
        import fcntl

        fcntl_fn = fcntl.fcntl
    fcntl_fn(fd, F_NOCACHE, 1)
    advise_random_reads(fd, "darwin", fcntl_fn)


def advise_random_reads(fd: int, platform: str = sys.platform,
                        fcntl_fn: Callable[[int, int, int], Any] | None = None) -> None:  # fmt: skip
    """Turn the kernel's read-ahead off for ``fd``: expert reads are random and always whole.

    With read-ahead on, reads of consecutive pieces of one expert look sequential and the kernel
    reads on past the expert (measured on Linux: 2.3x the bytes asked for, at half the rate).
    Linux: POSIX_FADV_RANDOM; macOS: F_RDAHEAD 0; elsewhere nothing.
    """
    if platform == "darwin":
        if fcntl_fn is None:
            import fcntl

            fcntl_fn = fcntl.fcntl
        fcntl_fn(fd, F_RDAHEAD, 0)
    elif hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)


def drop_file_cache(fd: int, offset: int = 0, length: int = 0,
                    fadvise: Callable[[int, int, int, int], None] | None = None,
                    platform: str = sys.platform,
                    msync_evict: Callable[[int, int, int], bool] = msync_invalidate) -> bool:  # fmt: skip
    """Evict fd's cached pages in [offset, offset+length) (0 = to the end); False where unsupported.

    Linux: posix_fadvise(POSIX_FADV_DONTNEED); dirty pages are not evicted, so fsync first
    after writing. macOS: mmap + msync(MS_INVALIDATE) (F_NOCACHE alone keeps pages already cached).
    See engine.platform.page_cache.eviction_method.
    """
    if platform == "darwin" and fadvise is None:
        return msync_evict(fd, offset, length)
    if fadvise is None:
        if not hasattr(os, "posix_fadvise"):
            return False
        fadvise = os.posix_fadvise
    fadvise(fd, offset, length, os.POSIX_FADV_DONTNEED)
    return True


def open_uncached(path: str | Path, platform: str = sys.platform,
                  fcntl_fn: Callable[[int, int, int], Any] | None = None) -> int:  # fmt: skip
    """Open for reads that avoid the page cache; any buffer works (no O_DIRECT alignment rules).

    macOS: F_NOCACHE and no read-ahead. Linux: existing cached pages are dropped and read-ahead
    is disabled (POSIX_FADV_RANDOM); call drop_file_cache after reading to keep the file cold.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise MissingFileError(f"{path}: file not found") from None
    try:
        if platform == "darwin":
            set_macos_nocache(fd, fcntl_fn)
        elif hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            drop_file_cache(fd)
    except OSError:
        os.close(fd)
        raise
    return fd


# --- cold read speed --------------------------------------------------------------------------


def _files_under(path: Path) -> list[tuple[Path, int]]:
    """Regular, non-empty files at path (a file or a directory, recursively) with their sizes."""
    if not path.exists():
        raise MissingFileError(f"{path}: no such file or directory to measure read speed on")
    candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return [(p, p.stat().st_size) for p in candidates if not p.is_symlink() and p.stat().st_size > 0]


def plan_read_blocks(files: list[tuple[Path, int]], block_bytes: int, total_bytes: int,
                     seed: int = 0) -> list[tuple[int, int]]:  # fmt: skip
    """Pick distinct aligned (file index, offset) blocks, in random order, totalling ~total_bytes."""
    blocks = [(i, off) for i, (_, size) in enumerate(files) for off in range(0, size - block_bytes + 1, block_bytes)]
    random.Random(seed).shuffle(blocks)
    return blocks[: max(1, total_bytes // block_bytes)] if blocks else []


def measure_cold_read_speed(path_or_dir: str | Path, block_bytes: int = 4 << 20, threads: int = 4,
                            total_bytes: int = 1 << 30) -> float:  # fmt: skip
    """Read random distinct blocks of existing files in parallel, bypassing the page cache; bytes/s.

    Uses O_DIRECT into page-aligned mmap buffers where the filesystem allows it, otherwise
    evicts each file (posix_fadvise DONTNEED, or F_NOCACHE on macOS) and reads buffered with
    read-ahead off. Reads no more than the files hold; raises MissingFileError if too little.
    """
    if block_bytes <= 0 or threads <= 0 or total_bytes <= 0:
        raise RequestError(f"block_bytes, threads and total_bytes must be positive "
                          f"(got {block_bytes}, {threads}, {total_bytes})")  # fmt: skip
    block = -(-block_bytes // DIRECT_ALIGN) * DIRECT_ALIGN
    files = _files_under(Path(path_or_dir))
    blocks = plan_read_blocks(files, block, total_bytes)
    if not blocks:
        raise MissingFileError(f"{path_or_dir}: no file holds a whole {block}-byte block to read")
    fds: list[int] = []
    try:
        for file_path, _ in files:
            fd = open_direct(file_path)
            fds.append(fd if fd is not None else open_uncached(file_path))
        return _timed_parallel_reads(fds, [f for f, _ in files], blocks, block, threads)
    finally:
        for fd in fds:
            os.close(fd)


def _timed_parallel_reads(fds: list[int], names: list[Path], blocks: list[tuple[int, int]], block: int,
                          threads: int) -> float:  # fmt: skip
    """Read blocks with `threads` workers, each into its own aligned buffer; return bytes/s."""
    chunks = [blocks[i::threads] for i in range(min(threads, len(blocks)))]

    def worker(my_blocks: list[tuple[int, int]]) -> int:
        """Read this worker's blocks; return the bytes read."""
        buf = mmap.mmap(-1, block)  # page-aligned, as O_DIRECT needs
        done = 0
        try:
            for file_index, offset in my_blocks:
                n = os.preadv(fds[file_index], [buf], offset)
                if n <= 0:
                    raise ExpertReadError(f"{names[file_index]}: read at offset {offset} returned {n} bytes")
                done += n
        finally:
            buf.close()
        return done

    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(chunks)) as pool:
        total = sum(pool.map(worker, chunks))
    elapsed = time.perf_counter() - start
    return total / elapsed if elapsed > 0 else float("inf")
