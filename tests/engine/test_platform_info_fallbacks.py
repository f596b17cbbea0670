"""platform_info's fallbacks and OS branches through fakes: when the preferred source is missing or
fails, the next one answers (or a named error), and no file descriptor is left open."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest

import engine.platform_info as pi
from engine.errors import ExpertReadError


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_macos_pressure_falls_back_to_available_ram_when_sysctl_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_sysctl() -> Any:
        raise OSError(errno.ENOENT, "sysctlbyname(kern.memorystatus_vm_pressure_level) failed")

    monkeypatch.setattr(pi, "macos_memory_pressure", no_sysctl)
    pressure = pi.memory_pressure("darwin")
    assert pressure.source == "psutil.virtual_memory" and 0.0 <= pressure.raw <= 1.0
    assert pressure.level in ("normal", "warning", "critical") and pressure.detail.endswith("of RAM available")


def test_the_c_library_is_loaded_with_errno() -> None:
    libc = pi._libc()
    assert libc.getpid() == os.getpid()


def test_mountinfo_lines_without_a_source_are_skipped(tmp_path: Path) -> None:
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(
        f"50 1 0:60 / {tmp_path} rw\n"  # no " - " separator
        f"51 1 0:61 / {tmp_path} rw - ext4\n"  # no source after the type
        "27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n"
    )
    assert pi.mount_source_of(tmp_path / "model", mountinfo) == "/dev/vda"


def _sys_root(tmp_path: Path, major: int, minor: int, disk: str) -> Path:
    root = tmp_path / "sys"
    target = root / "devices" / disk
    target.mkdir(parents=True)
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / f"{major}:{minor}").symlink_to(target)
    return root


def test_an_anonymous_device_is_found_through_its_mount_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """btrfs and overlay report an anonymous st_dev: the mount source's device names the disk."""
    null = os.stat("/dev/null").st_rdev  # a device node that exists everywhere, standing in for /dev/sdb2
    root = _sys_root(tmp_path, os.major(null), os.minor(null), "sdb")
    monkeypatch.setattr(pi, "mount_source_of", lambda path: "/dev/null")
    assert pi.linux_disk_of_path(tmp_path, root) == "sdb"


@pytest.mark.parametrize("source", ["/dev/no-such-device", "overlay", None])
def test_an_anonymous_device_without_a_usable_mount_source_is_unknown(
    source: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pi, "mount_source_of", lambda path: source)
    assert pi.linux_disk_of_path(tmp_path, tmp_path / "empty-sys") is None


def test_no_disk_name_on_a_platform_without_one(tmp_path: Path) -> None:
    assert pi.disk_of_path(tmp_path, "win32") is None


def test_disk_of_path_on_macos_reads_the_partition_list(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []
    monkeypatch.setattr(pi, "macos_disk_of_path", lambda path: seen.append(path) or "disk3")
    assert pi.disk_of_path(tmp_path, "darwin") == "disk3" and seen == [tmp_path]


def test_no_counters_at_all_reads_as_zero(tmp_path: Path) -> None:
    counters = pi.disk_read_counters(tmp_path, counters=lambda perdisk: None, platform="linux")
    assert counters == pi.DiskReadCounters(None, 0, 0, 0)


def test_without_o_direct_nothing_is_opened_direct(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "O_DIRECT", raising=False)
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    assert pi.o_direct_flag() is None and pi.open_direct(path) is None and pi.supports_o_direct(path) is False


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_filesystem_refusing_o_direct_is_unsupported_not_an_error(code: int, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if pi.o_direct_flag() is None:
        monkeypatch.setattr(os, "O_DIRECT", 0o40000, raising=False)

    def refuse(path: Any, flags: int, *args: Any) -> int:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, "open", refuse)
    assert pi.open_direct(tmp_path / "f") is None


def test_other_o_direct_open_errors_are_raised(tmp_path: Path) -> None:
    if pi.o_direct_flag() is None:
        pytest.skip("no O_DIRECT on this OS")
    with pytest.raises(FileNotFoundError):
        pi.open_direct(tmp_path / "absent")


def test_an_aligned_read_that_fails_means_no_o_direct_and_closes_the_file(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    if pi.o_direct_flag() is None:
        pytest.skip("no O_DIRECT on this OS")
    path = tmp_path / "f"
    path.write_bytes(b"x" * 8192)
    probe = pi.open_direct(path)
    if probe is None:
        pytest.skip("this filesystem refuses O_DIRECT")
    os.close(probe)

    def fail(fd: int, buffers: Any, offset: int) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "preadv", fail)
    before = _open_fds()
    assert pi.supports_o_direct(path) is False
    assert _open_fds() == before


def test_macos_nocache_goes_through_fcntl(monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    calls: list[tuple[int, int, int]] = []
    monkeypatch.setattr(fcntl, "fcntl", lambda fd, cmd, arg: calls.append((fd, cmd, arg)))
    pi.set_macos_nocache(7)
    assert calls == [(7, pi.F_NOCACHE, 1), (7, pi.F_RDAHEAD, 0)]


def test_evicting_without_posix_fadvise_is_unsupported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "posix_fadvise", raising=False)
    assert pi.drop_file_cache(0, platform="linux") is False


def test_an_uncached_open_that_cannot_set_its_flags_closes_the_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x")
    before = _open_fds()

    def refuse(fd: int, cmd: int, arg: int) -> None:
        raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(OSError, match="Bad file descriptor"):
        pi.open_uncached(path, platform="darwin", fcntl_fn=refuse)
    assert _open_fds() == before


def test_a_read_past_the_end_names_the_file_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "experts.bin"
    path.write_bytes(b"x" * 4096)
    fd = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(ExpertReadError, match=rf"{path.name}: read at offset 8192 returned 0 bytes"):
            pi._timed_parallel_reads([fd], [path], [(0, 8192)], 4096, threads=1)
    finally:
        os.close(fd)
