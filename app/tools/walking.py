"""Walking an opened folder by descriptor: entries in name order, never following symlinks, never
crossing into another device (a disk mounted inside the folder is reported, not entered)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from app.tools.names import shown, unsafe_character
from app.tools.sandbox import FILE_OPEN_FLAGS, FOLDER_OPEN_FLAGS

# Folders that hold tool or package internals, listed but not descended into.
SKIPPED_FOLDERS = frozenset({".git", ".hg", ".svn", "node_modules", "__pycache__"})
MAX_DEPTH = 32


@dataclass(frozen=True)
class WalkEntry:
    """One entry met during a walk; `parent_fd` is open while the entry is being handled."""

    parent_fd: int
    name: str
    shown: str
    stat: os.stat_result | None  # None: the entry vanished or could not be examined
    depth: int
    other_device: bool = False  # on another device than the walked folder (a mount point)

    @property
    def is_folder(self) -> bool:
        """True for a real folder (not a symlink to one)."""
        return self.stat is not None and stat.S_ISDIR(self.stat.st_mode)

    @property
    def is_file(self) -> bool:
        """True for a regular file (not a symlink to one)."""
        return self.stat is not None and stat.S_ISREG(self.stat.st_mode)

    @property
    def is_symlink(self) -> bool:
        """True for a symbolic link."""
        return self.stat is not None and stat.S_ISLNK(self.stat.st_mode)

    @property
    def has_unsafe_name(self) -> bool:
        """True if the name holds hidden or control characters (tools will not open it by name)."""
        return unsafe_character(self.name) is not None

    def is_expanded(self) -> bool:
        """Whether a recursive walk goes into this entry."""
        return self.is_folder and self.name not in SKIPPED_FOLDERS and not self.has_unsafe_name and not self.other_device

    def open_file(self) -> int:
        """Open this regular file read-only relative to its folder, checking it is still the same file."""
        assert self.stat is not None
        fd = os.open(self.name, FILE_OPEN_FLAGS, dir_fd=self.parent_fd)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (self.stat.st_dev, self.stat.st_ino) or not stat.S_ISREG(now.st_mode):
            os.close(fd)
            raise FileNotFoundError(f"{self.name} changed during the walk")
        return fd


def walk_folder(folder_fd: int, folder_shown: str, recursive: bool) -> Iterator[WalkEntry]:
    """Entries of an opened folder in name order, depth first when `recursive`; symlinks are reported, not followed."""
    yield from _walk(folder_fd, folder_shown, recursive, 0, os.fstat(folder_fd).st_dev)


def entry_stat(name: str, folder_fd: int) -> os.stat_result:
    """lstat of `name` in an opened folder."""
    return os.stat(name, dir_fd=folder_fd, follow_symlinks=False)


def _walk(folder_fd: int, folder_shown: str, recursive: bool, depth: int, device: int) -> Iterator[WalkEntry]:
    try:
        names = sorted(os.listdir(folder_fd))
    except OSError:
        return
    for name in names:
        try:
            info: os.stat_result | None = entry_stat(name, folder_fd)
        except OSError:
            info = None
        other_device = info is not None and info.st_dev != device
        entry = WalkEntry(folder_fd, name, f"{folder_shown}/{shown(name)}", info, depth, other_device)
        yield entry
        if not (recursive and entry.is_expanded() and depth + 1 < MAX_DEPTH):
            continue
        try:
            child_fd = os.open(name, FOLDER_OPEN_FLAGS, dir_fd=folder_fd)
        except OSError:
            continue
        try:
            now = os.fstat(child_fd)
            assert info is not None
            if (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino) and now.st_dev == device:
                yield from _walk(child_fd, entry.shown, recursive, depth + 1, device)
        finally:
            os.close(child_fd)
