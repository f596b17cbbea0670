"""The tool sandbox: tools may open only what the user dropped onto the window, and only to read.

A dropped item is recorded with its real path and its identity at drop time (app/tools/identity.py:
device, inode, size, times and birth time, since an inode number alone is reused at once after a
delete). A file inside a dropped folder with more than one hard link is read only when it is a
dropped file by that whole identity. Walks and paths never cross into another device (a disk
mounted inside a dropped folder). A tool path is
either the item's displayed name followed by components inside it ("project/src/main.py") or an
absolute path inside a dropped item. Paths are opened one component at a time relative to the
folder already opened (openat with O_NOFOLLOW), so renames or symlinks planted during the walk
cannot lead outside; symlinks are followed only when their target lies inside a dropped item.
Every check that matters is made on the opened descriptor (fstat), not on a path.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

from app.tools.errors import ToolError
from app.tools.identity import FileIdentity, birth_time_at, birth_time_of_fd
from app.tools.limits import DEFAULT_LIMITS, ToolLimits, human_size
from app.tools.names import check_path_argument, explain_lookalike, shown
from app.tools.textfile import sniff_fd

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# O_NONBLOCK: opening a FIFO that slipped past the checks returns at once instead of hanging.
FILE_OPEN_FLAGS = os.O_RDONLY | _NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _CLOEXEC
FOLDER_OPEN_FLAGS = os.O_RDONLY | os.O_DIRECTORY | _NOFOLLOW | _CLOEXEC
SYSTEM_ROOTS = ("/proc", "/sys", "/dev")

REASON_TOO_BIG = "too big"
REASON_BINARY = "not text (binary)"
REASON_UNREADABLE = "unreadable"
REASON_NOT_FILE_OR_FOLDER = "not a regular file or folder"


@dataclass(frozen=True)
class DroppedItem:
    """A file or folder the user dropped: its displayed name, real path and identity at drop time."""

    name: str
    path: str
    is_folder: bool
    device: int
    inode: int
    size: int
    mtime_ns: int = 0
    ctime_ns: int = 0
    birth_ns: int | None = None

    @property
    def identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) recorded when the item was dropped."""
        return (self.device, self.inode)

    @property
    def file_identity(self) -> FileIdentity:
        """The whole identity recorded when the item was dropped."""
        return FileIdentity(self.device, self.inode, self.size, self.mtime_ns, self.ctime_ns, self.birth_ns)

    def differs_from(self, info: os.stat_result, birth_ns: int | None) -> str | None:
        """None if (`info`, `birth_ns`) is still the dropped item; otherwise how it differs (see FileIdentity)."""
        return self.file_identity.differs_from(info, birth_ns, contents_may_change=self.is_folder)


@dataclass
class OpenedPath:
    """A file or folder opened read-only for a tool; close it (or use `with`) when done."""

    fd: int
    stat: os.stat_result
    shown: str
    real_path: str
    item: DroppedItem
    inside_folder: bool  # reached inside a dropped folder rather than being a dropped item itself

    @property
    def is_folder(self) -> bool:
        """True for a folder, False for a regular file."""
        return stat.S_ISDIR(self.stat.st_mode)

    def close(self) -> None:
        """Close the descriptor (safe to call twice)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


class _MissingEntry(ToolError):
    """A path component does not exist; `depth` says which one."""

    def __init__(self, message: str, depth: int, is_lookalike: bool) -> None:
        super().__init__(message)
        self.depth = depth
        self.is_lookalike = is_lookalike


def kind_of(mode: int) -> str:
    """A short description of a file type from st_mode, e.g. 'named pipe (FIFO)'."""
    if stat.S_ISREG(mode):
        return "regular file"
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISLNK(mode):
        return "symbolic link"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "special file"


def is_system_path(real_path: str) -> bool:
    """True for paths in /proc, /sys or /dev, whose files are views of the system, not documents."""
    return any(real_path == root or real_path.startswith(root + "/") for root in SYSTEM_ROOTS)


def os_error_message(error: OSError, what: str) -> str:
    """A readable sentence for an OSError raised while opening `what`."""
    reasons = {
        errno.ENOENT: "does not exist", errno.EACCES: "cannot be read (permission denied)",
        errno.EPERM: "cannot be read (operation not permitted)", errno.ENOTDIR: "is not inside a folder",
        errno.ELOOP: "changed into a symbolic link while it was being opened",
        errno.ENAMETOOLONG: "has a name that is too long", errno.ENXIO: "is a socket or device with nothing behind it",
        errno.EISDIR: "is a folder",
    }
    reason = reasons.get(error.errno or 0, f"could not be opened ({error.strerror or error})")
    return f"'{what}' {reason}."


def _display_name(path: Path, real_path: str) -> str:
    return shown(path.name or Path(real_path).name or real_path)


def _classify_one(path: Path, limits: ToolLimits) -> DroppedItem | str:
    try:
        real_path = os.path.realpath(path, strict=True)
    except (OSError, ValueError):
        return REASON_UNREADABLE
    if is_system_path(real_path):
        return REASON_NOT_FILE_OR_FOLDER
    try:
        # Look before opening so that devices and FIFOs are never opened at all.
        mode = os.stat(real_path, follow_symlinks=False).st_mode
    except OSError:
        return REASON_UNREADABLE
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        return REASON_NOT_FILE_OR_FOLDER
    try:
        fd = os.open(real_path, FOLDER_OPEN_FLAGS if stat.S_ISDIR(mode) else FILE_OPEN_FLAGS)
    except OSError:
        return REASON_UNREADABLE
    try:
        info = os.fstat(fd)
        birth_ns = birth_time_of_fd(fd)
        if stat.S_ISREG(info.st_mode):
            if info.st_size > limits.max_file_bytes:
                return REASON_TOO_BIG
            if sniff_fd(fd, info.st_size, limits.sniff_bytes) is not None:
                return REASON_BINARY
        elif stat.S_ISDIR(info.st_mode):
            os.listdir(fd)
        else:
            return REASON_NOT_FILE_OR_FOLDER
    except OSError:
        return REASON_UNREADABLE
    finally:
        os.close(fd)
    identity = FileIdentity.of(info, birth_ns)
    return DroppedItem(name=_display_name(path, real_path), path=real_path, is_folder=stat.S_ISDIR(info.st_mode),
                       device=identity.device, inode=identity.inode, size=identity.size, mtime_ns=identity.mtime_ns,
                       ctime_ns=identity.ctime_ns, birth_ns=identity.birth_ns)


def classify_drop(paths: Iterable[str | os.PathLike[str]], limits: ToolLimits = DEFAULT_LIMITS,
                  ) -> tuple[list[DroppedItem], list[tuple[Path, str]]]:
    """Split dropped paths into accepted items and (path, reason) rejections for the drop overlay.

    Reasons: "too big", "not text (binary)", "unreadable", "not a regular file or folder".
    """
    accepted: list[DroppedItem] = []
    rejected: list[tuple[Path, str]] = []
    for raw in paths:
        path = Path(raw)
        outcome = _classify_one(path, limits)
        if isinstance(outcome, str):
            rejected.append((path, outcome))
        else:
            accepted.append(outcome)
    return accepted, rejected


def _containing_item(path: str, items: list[DroppedItem]) -> tuple[DroppedItem, list[str]] | None:
    """The dropped item that is `path` or a folder containing it (the deepest one), with the rest of the path."""
    best: tuple[DroppedItem, list[str]] | None = None
    for item in items:
        if path == item.path:
            rest: list[str] = []
        elif item.is_folder and path.startswith(item.path.rstrip("/") + "/"):
            rest = [part for part in path[len(item.path):].split("/") if part]
        else:
            continue
        if best is None or len(item.path) > len(best[0].path):
            best = (item, rest)
    return best


def _locate(path: str, items: list[DroppedItem]) -> tuple[str, tuple[DroppedItem, list[str]] | None]:
    """Find the dropped item holding absolute `path`, also trying the path with its parent folders resolved.

    The second try accepts spellings through symlinked parents (/tmp → /private/tmp on macOS). It only
    picks the item; the walk from that item then applies every rule, so it cannot widen access.
    """
    match = _containing_item(path, items)
    if match is None and path != "/":
        resolved = os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))
        match = _containing_item(resolved, items)
        if match is not None:
            return resolved, match
    return path, match


class DroppedFiles:
    """The set of files and folders the user dropped; the only things tools can open."""

    def __init__(self, limits: ToolLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._items: dict[str, DroppedItem] = {}
        self._lock = threading.Lock()

    def drop(self, paths: Iterable[str | os.PathLike[str]]) -> tuple[list[DroppedItem], list[tuple[Path, str]]]:
        """Classify `paths` and add the accepted ones; returns (items added, (path, reason) rejected)."""
        accepted, rejected = classify_drop(paths, self.limits)
        return [self.add(item) for item in accepted], rejected

    def add(self, item: DroppedItem) -> DroppedItem:
        """Add an item; a second item with the same name is renamed 'name (2).ext'. Returns the stored item."""
        with self._lock:
            for existing in self._items.values():
                if existing.path == item.path and existing.file_identity == item.file_identity:
                    return existing
            name = item.name
            stem, dot, suffix = name.rpartition(".") if not item.is_folder and "." in name[1:] else (name, "", "")
            counter = 1
            while name in self._items:
                counter += 1
                name = f"{stem} ({counter}){dot}{suffix}"
            stored = dataclasses.replace(item, name=name)
            self._items[name] = stored
            return stored

    def remove(self, name: str) -> bool:
        """Forget the item called `name` (the chip's close button); False if there was none."""
        with self._lock:
            return self._items.pop(name, None) is not None

    def clear(self) -> None:
        """Forget every dropped item."""
        with self._lock:
            self._items.clear()

    def items(self) -> list[DroppedItem]:
        """The dropped items, in the order they were dropped."""
        with self._lock:
            return list(self._items.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)

    def describe_for_model(self) -> str:
        """A short text listing what tools can open, for the system prompt."""
        items = self.items()
        if not items:
            return "The user has not dropped any files or folders, so the file tools have nothing to open."
        lines = ["Files and folders the user dropped (the file tools can open only these and what is inside them):"]
        for item in items:
            lines.append(f"- {item.name}/ (folder)" if item.is_folder else f"- {item.name} ({human_size(item.size)})")
        return "\n".join(lines)

    def open(self, path: str) -> OpenedPath:
        """Open a tool path read-only after every sandbox check; raises ToolError saying why if refused."""
        check_path_argument(path, self.limits.max_path_chars)
        items = self.items()
        if not items:
            raise ToolError("No files or folders have been dropped, so there is nothing to open. Ask the user "
                            "to drop the files you need onto the MoeBar window.")
        return self._open_argument(path, items)

    def open_file(self, path: str, *, require_text: bool = True) -> OpenedPath:
        """Open a regular file within the size cap (and, by default, UTF-8 text); ToolError otherwise."""
        opened = self.open(path)
        try:
            if opened.is_folder:
                raise ToolError(f"'{opened.shown}' is a folder, not a file. Use list_folder to see what it contains.")
            size = opened.stat.st_size
            if size > self.limits.max_file_bytes:
                raise ToolError(f"'{opened.shown}' is too big ({size:,} bytes); tools read files up to "
                                f"{self.limits.max_file_bytes:,} bytes ({human_size(self.limits.max_file_bytes)}).")
            if require_text:
                problem = sniff_fd(opened.fd, size, self.limits.sniff_bytes)
                if problem is not None:
                    raise ToolError(f"'{opened.shown}' looks like a binary file (it {problem}); tools only read "
                                    "UTF-8 text.")
        except BaseException:
            opened.close()
            raise
        return opened

    def open_folder(self, path: str) -> OpenedPath:
        """Open a folder (a dropped one or one inside it); ToolError if it is not a folder."""
        opened = self.open(path)
        if not opened.is_folder:
            opened.close()
            raise ToolError(f"'{opened.shown}' is a file, not a folder. Use read_file or file_info on it.")
        return opened

    def dropped_file_identities(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of every dropped file (not folder)."""
        return {item.identity for item in self.items() if not item.is_folder}

    def is_dropped_file(self, info: os.stat_result, birth_ns: int | None) -> bool:
        """Whether (`info`, `birth_ns`) is one of the dropped files by its whole identity, not only its inode number."""
        return any(not item.is_folder and item.differs_from(info, birth_ns) is None for item in self.items())

    def _open_argument(self, path: str, items: list[DroppedItem]) -> OpenedPath:
        parts = [part for part in path.split("/") if part not in ("", ".")]
        if ".." in parts:
            raise ToolError(f"The path '{shown(path)}' contains '..'. Tools cannot step out of a dropped folder; "
                            "give the path from a dropped item downwards, such as 'project/src/main.py'.")
        if path.startswith("/"):
            return self._open_absolute(path, parts, items)
        if not parts:
            raise ToolError(f"The path '{shown(path)}' names no file or folder.")
        by_name = {item.name: item for item in items}
        if parts[0] in by_name:
            return self._walk(by_name[parts[0]], parts[1:], items, hops=0)
        folders = [item for item in items if item.is_folder]
        inside_folder_hint = None
        if len(folders) == 1:  # models often give paths relative to the one dropped folder
            try:
                return self._walk(folders[0], parts, items, hops=0)
            except _MissingEntry as missing:
                if missing.depth > 0:
                    raise
                inside_folder_hint = str(missing) if missing.is_lookalike else None
        hint = explain_lookalike(parts[0], list(by_name), "the dropped items") or inside_folder_hint
        available = ", ".join(f"'{name}'" for name in by_name)
        raise ToolError(hint or f"'{shown(path)}' is not a dropped file or folder, nor inside one. The tools can "
                                f"open only: {available}.")

    def _open_absolute(self, path: str, parts: list[str], items: list[DroppedItem]) -> OpenedPath:
        normalized, match = _locate("/" + "/".join(parts), items)
        if is_system_path(normalized):
            raise ToolError(f"'{shown(path)}' is a system file under /proc, /sys or /dev; tools never open those.")
        if match is None:
            available = ", ".join(f"'{item.name}'" for item in items)
            raise ToolError(f"'{shown(path)}' is not inside any file or folder the user dropped, so tools may not "
                            f"open it. They can open only: {available}.")
        return self._walk(match[0], match[1], items, hops=0)

    def _open_item_root(self, item: DroppedItem) -> int:
        try:
            before = os.stat(item.path, follow_symlinks=False)
        except FileNotFoundError:
            raise ToolError(f"'{item.name}' no longer exists at {shown(item.path)}; it was moved or deleted after "
                            "it was dropped. Drop it again.") from None
        except OSError as error:
            raise ToolError(os_error_message(error, item.name)) from None
        if stat.S_ISLNK(before.st_mode):
            raise ToolError(f"'{item.name}' was replaced by a symbolic link after it was dropped, and tools do not "
                            "follow it. Drop the file or folder again if this is intended.")
        def replaced(why: str) -> ToolError:
            return ToolError(f"'{item.name}' was replaced by a different file or changed after it was dropped ({why}). "
                             "Drop it again to let tools open it as it is now.")

        if (why := item.differs_from(before, birth_time_at(item.path))) is not None:
            raise replaced(why)
        try:
            fd = os.open(item.path, FOLDER_OPEN_FLAGS if item.is_folder else FILE_OPEN_FLAGS)
        except OSError as error:
            raise ToolError(os_error_message(error, item.name)) from None
        after = os.fstat(fd)
        if (why := item.differs_from(after, birth_time_of_fd(fd))) is not None:
            os.close(fd)
            raise replaced(why)
        return fd

    def _walk(self, item: DroppedItem, rest: list[str], items: list[DroppedItem], hops: int) -> OpenedPath:
        fd = self._open_item_root(item)
        real_path, shown_path = item.path, item.name
        try:
            if rest and not item.is_folder:
                raise ToolError(f"'{item.name}' is a file, not a folder, so nothing can be inside it.")
            for depth, name in enumerate(rest):
                is_last = depth == len(rest) - 1
                entry = self._lookup(fd, name, shown_path, depth)
                child_real = os.path.join(real_path, name)
                child_shown = f"{shown_path}/{shown(name)}"
                if stat.S_ISLNK(entry.st_mode):
                    target = os.readlink(name, dir_fd=fd)
                    os.close(fd)
                    fd = -1
                    return self._follow_symlink(child_shown, real_path, target, rest[depth + 1:], items, hops)
                if not is_last and not stat.S_ISDIR(entry.st_mode):
                    raise ToolError(f"'{child_shown}' is a {kind_of(entry.st_mode)}, not a folder.")
                if not (stat.S_ISREG(entry.st_mode) or stat.S_ISDIR(entry.st_mode)):
                    raise ToolError(f"'{child_shown}' is a {kind_of(entry.st_mode)}; tools only open regular files "
                                    "and folders.")
                if entry.st_dev != item.device:
                    raise ToolError(f"'{child_shown}' is on another disk mounted inside the dropped folder; tools "
                                    "stay on the dropped folder's own disk. Drop it separately to allow it.")
                flags = FOLDER_OPEN_FLAGS if stat.S_ISDIR(entry.st_mode) else FILE_OPEN_FLAGS
                try:
                    child_fd = os.open(name, flags, dir_fd=fd)
                except OSError as error:
                    raise ToolError(os_error_message(error, child_shown)) from None
                os.close(fd)
                fd = child_fd
                opened_stat = os.fstat(fd)
                if (opened_stat.st_dev, opened_stat.st_ino) != (entry.st_dev, entry.st_ino):
                    raise ToolError(f"'{child_shown}' changed while it was being opened; try again.")
                real_path, shown_path = child_real, child_shown
            opened = self._checked(fd, item, shown_path, real_path, inside_folder=bool(rest))
            fd = -1  # now owned by `opened`
            return opened
        finally:
            if fd >= 0:
                os.close(fd)

    def _lookup(self, dir_fd: int, name: str, shown_path: str, depth: int) -> os.stat_result:
        try:
            entry = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            entry = None
        except OSError as error:
            raise ToolError(os_error_message(error, f"{shown_path}/{shown(name)}")) from None
        names = os.listdir(dir_fd)
        # On case- or normalization-insensitive disks (macOS) stat finds lookalikes too: insist on the exact name.
        if entry is None or name not in names:
            hint = explain_lookalike(name, names, f"'{shown_path}'")
            raise _MissingEntry(hint or f"There is no '{shown(name)}' in '{shown_path}'. Use list_folder to see "
                                        "what it contains.", depth, is_lookalike=hint is not None)
        return entry

    def _follow_symlink(self, link_shown: str, folder_real: str, target: str, rest: list[str],
                        items: list[DroppedItem], hops: int) -> OpenedPath:
        if hops >= self.limits.max_symlink_hops:
            raise ToolError(f"'{link_shown}' leads through more than {self.limits.max_symlink_hops} symbolic links "
                            "(probably a loop); tools stop there.")
        # folder_real has no symlinks in it (it was walked with O_NOFOLLOW), so '..' in the target can be
        # resolved by plain path arithmetic.
        resolved, match = _locate(os.path.normpath(os.path.join(folder_real, target, *rest)), items)
        if is_system_path(resolved) or match is None:
            raise ToolError(f"'{link_shown}' is a symbolic link to '{shown(target)}', which is outside the files and "
                            "folders the user dropped, so tools do not follow it.")
        return self._walk(match[0], match[1], items, hops + 1)

    def _checked(self, fd: int, item: DroppedItem, shown_path: str, real_path: str,
                 inside_folder: bool) -> OpenedPath:
        info = os.fstat(fd)
        if is_system_path(real_path):
            raise ToolError(f"'{shown_path}' is a system file under /proc, /sys or /dev; tools never open those.")
        if not (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode)):
            raise ToolError(f"'{shown_path}' is a {kind_of(info.st_mode)}; tools only open regular files and folders.")
        if inside_folder and info.st_dev != item.device:
            raise ToolError(f"'{shown_path}' is on another disk mounted inside the dropped folder; tools stay on the "
                            "dropped folder's own disk.")
        if (inside_folder and stat.S_ISREG(info.st_mode) and info.st_nlink > 1
                and not self.is_dropped_file(info, birth_time_of_fd(fd))):
            raise ToolError(f"'{shown_path}' has {info.st_nlink} hard links, so the same file may also live outside "
                            "the dropped folder; tools do not read it. Drop the file itself to allow it.")
        return OpenedPath(fd=fd, stat=info, shown=shown_path, real_path=real_path, item=item,
                          inside_folder=inside_folder)
