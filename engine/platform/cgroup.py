"""A memory cgroup (Linux, cgroup v1) to run a process under a RAM limit that includes its page cache.

Used by ``moebar-engine bench --cache-sweep ... --cgroup-limit-mb`` to play a Mac whose model is
larger than its RAM in miniature: the engine and the page cache it fills are charged to one
cgroup, and the kernel reclaims page cache at the limit (and kills the process when its own
memory alone exceeds it). Only the v1 controller is supported (``memory.limit_in_bytes``); where
it is missing or not writable (macOS, no root, cgroup v2 only), :func:`memory_cgroup_root` raises
:class:`CgroupUnavailable` with the reason.
"""

from __future__ import annotations

import errno
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from engine.errors import MoeBarError

DEFAULT_ROOT = Path("/sys/fs/cgroup/memory")
LIMIT_FILE = "memory.limit_in_bytes"


class CgroupUnavailable(MoeBarError):
    """No writable cgroup v1 memory controller on this machine."""

    code = "cgroup_unavailable"


def memory_cgroup_root(root: Path = DEFAULT_ROOT, platform: str = sys.platform) -> Path:
    """The memory controller's directory where new cgroups are made; raises CgroupUnavailable if unusable."""
    hint = "run the sweep without --cgroup-limit-mb"
    if not platform.startswith("linux"):
        raise CgroupUnavailable(f"memory cgroups are Linux-only (this is {platform}); {hint}")
    if not (root / LIMIT_FILE).is_file():
        raise CgroupUnavailable(
            f"no cgroup v1 memory controller at {root} ({LIMIT_FILE} missing; cgroup v2 is not supported); {hint}"
        )
    if not os.access(root, os.W_OK):
        raise CgroupUnavailable(f"{root} is not writable (making a memory cgroup needs root); {hint}")
    return root


def parse_memory_stat(text: str) -> dict[str, int]:
    """``memory.stat`` ("cache 123\\nrss 456 ...") as a dict."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


@dataclass
class MemoryCgroup:
    """One memory cgroup directory (``create`` makes it; ``remove`` deletes it once its processes are gone)."""

    path: Path
    REMOVE_ATTEMPTS: ClassVar[int] = 20  # rmdir tries while the kernel says EBUSY
    REMOVE_DELAY_S: ClassVar[float] = 0.05

    @classmethod
    def create(cls, root: Path, name: str, limit_bytes: int) -> "MemoryCgroup":
        """Make ``root/name`` with a memory limit of ``limit_bytes`` (page cache included)."""
        if limit_bytes <= 0:
            raise ValueError(f"cgroup memory limit must be positive, got {limit_bytes}")
        path = root / name
        try:
            path.mkdir()
        except OSError as e:
            raise CgroupUnavailable(f"cannot make memory cgroup {path}: {e}") from e
        try:
            (path / LIMIT_FILE).write_text(str(int(limit_bytes)))
        except OSError as e:
            left = ""
            try:
                path.rmdir()  # not left behind half made
            except OSError as gone:
                left = f"; it could not be removed either ({gone})"
            raise CgroupUnavailable(f"cannot set {LIMIT_FILE} of memory cgroup {path} to {limit_bytes}: {e}{left}") from e
        return cls(path)

    @property
    def procs_file(self) -> Path:
        """Write a pid here to move that process (and the children it starts later) into the cgroup."""
        return self.path / "cgroup.procs"

    def add_process(self, pid: int) -> None:
        """Move ``pid`` into this cgroup (its later allocations and page-cache reads are charged here)."""
        add_to_cgroup(self.procs_file, pid)

    def _read(self, name: str) -> str:
        try:
            return (self.path / name).read_text()
        except OSError:
            return ""

    def limit_bytes(self) -> int:
        """The limit the kernel holds (rounded down to a page)."""
        text = self._read(LIMIT_FILE).strip()
        return int(text) if text else 0

    def max_usage_bytes(self) -> int:
        """The highest charge seen (process memory plus its page cache)."""
        text = self._read("memory.max_usage_in_bytes").strip()
        return int(text) if text else 0

    def stat(self) -> dict[str, int]:
        """``memory.stat``: cache, rss, mapped_file, pgmajfault, ... in bytes or counts."""
        return parse_memory_stat(self._read("memory.stat"))

    def oom_kills(self) -> int:
        """Processes the kernel's OOM killer ended in this cgroup (``memory.oom_control``)."""
        return parse_memory_stat(self._read("memory.oom_control")).get("oom_kill", 0)

    def remove(self) -> None:
        """Delete the cgroup (its page cache moves to the parent); quiet if already gone.

        While its last process is still exiting the kernel answers EBUSY: tried ``REMOVE_ATTEMPTS``
        times, ``REMOVE_DELAY_S`` apart, then the OSError (naming the path) is raised.
        """
        attempts = max(1, self.REMOVE_ATTEMPTS)
        for attempt in range(attempts):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:
                if e.errno != errno.EBUSY or attempt == attempts - 1:
                    raise OSError(e.errno, f"cannot remove memory cgroup {self.path}: {e.strerror}") from e
                time.sleep(self.REMOVE_DELAY_S)


def add_to_cgroup(procs_file: str | Path, pid: int) -> None:
    """Write ``pid`` to a cgroup's ``cgroup.procs``."""
    with open(procs_file, "w") as f:
        f.write(str(pid))
