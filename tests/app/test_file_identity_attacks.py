"""File identity attacks on the sandbox: an inode number reused by another file after a delete,
a file recreated at a dropped path, hard links judged by the whole identity, and disks mounted
inside a dropped folder (never walked into or opened).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.tools import DroppedFiles, ToolError, ToolLimits, ToolRegistry
from app.tools import identity as identity_module
from app.tools import walking

SECRET = "TOP SECRET 4242"
LIMITS = ToolLimits(max_file_bytes=1 << 20, search_timeout_s=2.0)


def _take_inode(folder: Path, inode: int, tries: int = 200) -> Path | None:
    """Create files in `folder` until one gets inode number `inode` (ext4 reuses a freed one at once)."""
    folder.mkdir(exist_ok=True)
    for n in range(tries):
        candidate = folder / f"secret{n}.txt"
        candidate.write_text(f"{SECRET}\n")
        if candidate.stat().st_ino == inode:
            return candidate
    return None


@pytest.fixture
def drops(tmp_path: Path) -> tuple[Path, Path, DroppedFiles]:
    project = tmp_path / "project"
    project.mkdir()
    (project / "a.txt").write_text("alpha\n")
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    dropped = DroppedFiles(LIMITS)
    assert len(dropped.drop([project, notes])[0]) == 2
    return project, notes, dropped


def test_hard_link_to_an_outside_file_that_reused_a_dropped_inode_is_refused(tmp_path: Path, drops) -> None:
    project, notes, dropped = drops
    (tmp_path / "outside").mkdir()  # before the delete: a new folder would take the freed inode itself
    inode = notes.stat().st_ino
    notes.unlink()
    outside = _take_inode(tmp_path / "outside", inode)
    if outside is None:
        pytest.skip("this file system did not reuse the inode number")
    os.link(outside, project / "hard.txt")  # same (device, inode) as the dropped notes.txt had
    registry = ToolRegistry(dropped)
    with pytest.raises(ToolError, match="hard links"):
        registry.run("read_file", {"path": "project/hard.txt"})
    for tool, args in [("search_text", {"pattern": "SECRET"}), ("list_folder", {"path": "project"})]:
        answer = registry.run(tool, args)
        assert SECRET not in answer
    assert "hard link, not readable" in registry.run("list_folder", {"path": "project"})
    assert "1 hard-linked" in registry.run("search_text", {"pattern": "SECRET"})


def test_a_file_recreated_at_the_dropped_path_is_not_read_as_the_original(tmp_path: Path, drops) -> None:
    _, notes, dropped = drops
    inode = notes.stat().st_ino
    notes.unlink()
    notes.write_text(f"{SECRET}\n")
    if notes.stat().st_ino != inode:
        pytest.skip("this file system did not reuse the inode number")
    with pytest.raises(ToolError, match="replaced by a different file or changed after it was dropped"):
        ToolRegistry(dropped).run("read_file", {"path": "notes.txt"})


def test_a_hard_link_to_the_dropped_file_itself_is_readable(drops) -> None:
    project, notes, dropped = drops
    os.link(notes, project / "same-notes.txt")
    if identity_module.birth_time_at(str(notes)) is None:  # the new link changed ctime, the only stand-in left
        with pytest.raises(ToolError):
            ToolRegistry(dropped).run("read_file", {"path": "project/same-notes.txt"})
        return
    assert ToolRegistry(dropped).run("read_file", {"path": "project/same-notes.txt"}).endswith("my notes")


def test_without_birth_times_a_changed_file_is_refused_and_an_unchanged_one_read(tmp_path: Path, monkeypatch) -> None:
    """Where no birth time can be read, size and times stand in: an edit after the drop means "drop it again"."""
    monkeypatch.setattr(identity_module, "_statx", None)
    monkeypatch.setattr(identity_module, "_stat_birth_ns", lambda info: None)
    notes = tmp_path / "notes.txt"
    notes.write_text("first\n")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([notes])
    assert dropped.items()[0].birth_ns is None
    registry = ToolRegistry(dropped)
    assert registry.run("read_file", {"path": "notes.txt"}).endswith("first")
    with open(notes, "a") as handle:
        handle.write("second\n")
    with pytest.raises(ToolError, match=r"changed \(size or times\)"):
        registry.run("read_file", {"path": "notes.txt"})


def test_birth_time_is_read_on_this_platform(tmp_path: Path) -> None:
    """The Linux path (statx) and the macOS one (st_birthtime) both give a birth time on a local disk."""
    path = tmp_path / "x.txt"
    path.write_text("x")
    fd = os.open(path, os.O_RDONLY)
    try:
        birth = identity_module.birth_time_of_fd(fd)
    finally:
        os.close(fd)
    if birth is None:
        pytest.skip("this file system keeps no birth time")
    assert birth == identity_module.birth_time_at(str(path))
    assert abs(birth - path.stat().st_mtime_ns) < 60 * 10**9


# ------------------------------------------------------------------ other devices


def test_a_folder_on_another_device_is_listed_but_never_walked(drops, monkeypatch) -> None:
    """A fake mount point (its stat reports another device): listed as such, not expanded, not searched."""
    project, _, dropped = drops
    (project / "mnt").mkdir()
    (project / "mnt" / "inside.txt").write_text(f"{SECRET}\n")
    real = walking.entry_stat

    def other_device_for_mnt(name: str, folder_fd: int) -> os.stat_result:
        info = real(name, folder_fd)
        if name != "mnt":
            return info
        fields = list(info)
        fields[2] = info.st_dev + 1  # st_dev
        return os.stat_result(fields)

    monkeypatch.setattr(walking, "entry_stat", other_device_for_mnt)
    registry = ToolRegistry(dropped)
    listing = registry.run("list_folder", {"path": "project", "recursive": True})
    assert "project/mnt/  (another disk mounted here, not opened)" in listing and "inside.txt" not in listing
    assert SECRET not in registry.run("search_text", {"pattern": "SECRET", "path": "project"})


@pytest.fixture
def mounted(drops) -> Iterator[Path]:
    """A real tmpfs mounted inside the dropped folder (root with mount rights only)."""
    project = drops[0]
    mount_point = project / "mnt"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "none", str(mount_point)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount here: {done.stderr.decode(errors='replace').strip()}")
    try:
        (mount_point / "inside.txt").write_text(f"{SECRET}\n")
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=False)


def test_a_real_mount_point_inside_a_dropped_folder_is_not_crossed(drops, mounted: Path) -> None:
    registry = ToolRegistry(drops[2])
    listing = registry.run("list_folder", {"path": "project", "recursive": True})
    assert "another disk mounted here" in listing and "inside.txt" not in listing
    assert SECRET not in registry.run("search_text", {"pattern": "SECRET"})
    for path in ("project/mnt/inside.txt", "project/mnt"):
        with pytest.raises(ToolError, match="another disk"):
            registry.run("read_file" if path.endswith(".txt") else "list_folder", {"path": path})
