"""DroppedFiles and classify_drop: what the drop overlay and chips use, and the read-only guarantee."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.tools import DroppedFiles, ToolError, ToolLimits, ToolRegistry, classify_drop

LIMITS = ToolLimits(max_file_bytes=1 << 20)


def test_classify_drop_accepts_text_files_and_folders_with_identity(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    folder = tmp_path / "folder"
    folder.mkdir()
    accepted, rejected = classify_drop([text, str(folder)], LIMITS)
    assert rejected == []
    file_item, folder_item = accepted
    info = text.stat()
    assert (file_item.name, file_item.path, file_item.is_folder, file_item.size) == (
        "notes.txt", str(text.resolve()), False, 6)
    assert file_item.identity == (info.st_dev, info.st_ino)
    assert (folder_item.name, folder_item.is_folder, folder_item.size) == ("folder", True, 0)


def test_classify_drop_keeps_order_and_mixes_accepted_and_rejected(tmp_path: Path) -> None:
    good = tmp_path / "good.md"
    good.write_text("# ok")
    binary = tmp_path / "photo.jpg"
    binary.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF")
    accepted, rejected = classify_drop([binary, good, tmp_path / "missing"], LIMITS)
    assert [item.name for item in accepted] == ["good.md"]
    assert rejected == [(binary, "not text (binary)"), (tmp_path / "missing", "unreadable")]


def test_file_exactly_at_the_size_cap_is_accepted(tmp_path: Path) -> None:
    exact = tmp_path / "exact.txt"
    exact.write_bytes(b"a" * LIMITS.max_file_bytes)
    over = tmp_path / "over.txt"
    over.write_bytes(b"a" * (LIMITS.max_file_bytes + 1))
    accepted, rejected = classify_drop([exact, over], LIMITS)
    assert [item.name for item in accepted] == ["exact.txt"] and rejected == [(over, "too big")]


def test_multibyte_character_cut_by_the_sniff_block_is_still_text(tmp_path: Path) -> None:
    path = tmp_path / "accents.txt"
    path.write_bytes(b"a" * (LIMITS.sniff_bytes - 1) + "é".encode() * 10)  # 'é' straddles the block end
    accepted, rejected = classify_drop([path], LIMITS)
    assert len(accepted) == 1 and rejected == []


def test_same_names_get_numbered_and_same_item_is_not_added_twice(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "notes.txt").write_text(f"from {folder}\n")
        (tmp_path / folder / "docs").mkdir()
    dropped = DroppedFiles(LIMITS)
    first, _ = dropped.drop([tmp_path / "a" / "notes.txt", tmp_path / "a" / "docs"])
    second, _ = dropped.drop([tmp_path / "b" / "notes.txt", tmp_path / "b" / "docs", tmp_path / "a" / "notes.txt"])
    assert [item.name for item in second] == ["notes (2).txt", "docs (2)", "notes.txt"]
    assert second[2] == first[0]
    assert len(dropped) == 4
    registry = ToolRegistry(dropped)
    assert registry.run("read_file", {"path": "notes (2).txt"}).endswith("from b")
    assert registry.run("read_file", {"path": "notes.txt"}).endswith("from a")


def test_remove_and_clear_take_items_out_of_reach(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("x\n")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([notes])
    registry = ToolRegistry(dropped)
    assert dropped.remove("notes.txt") is True and dropped.remove("notes.txt") is False
    with pytest.raises(ToolError, match="No files or folders have been dropped"):
        registry.run("read_file", {"path": "notes.txt"})
    dropped.drop([notes])
    dropped.clear()
    assert dropped.items() == []
    with pytest.raises(ToolError, match="nothing to search"):
        registry.run("search_text", {"pattern": "x"})


def test_describe_for_model_lists_the_drops(tmp_path: Path) -> None:
    dropped = DroppedFiles(LIMITS)
    assert "has not dropped any files" in dropped.describe_for_model()
    (tmp_path / "docs").mkdir()
    (tmp_path / "todo.txt").write_text("x" * 2048)
    dropped.drop([tmp_path / "docs", tmp_path / "todo.txt"])
    assert dropped.describe_for_model().splitlines()[1:] == ["- docs/ (folder)", "- todo.txt (2.0 KB)"]


def test_unsafe_characters_in_a_dropped_name_are_escaped_for_display(tmp_path: Path) -> None:
    tricky = tmp_path / "report\u202etxt.exe"
    tricky.write_text("x\n")
    dropped = DroppedFiles(LIMITS)
    [item], _ = dropped.drop([tricky])
    assert item.name == "report\\u202etxt.exe"
    assert ToolRegistry(dropped).run("read_file", {"path": "report\\u202etxt.exe"}).endswith("x")


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    state = {}
    for folder, names, files in os.walk(root):
        for name in names + files:
            path = os.path.join(folder, name)
            info = os.lstat(path)
            content = Path(path).read_bytes() if os.path.isfile(path) and not os.path.islink(path) else None
            state[path] = (content, info.st_mtime_ns)
    return state


def test_tools_open_everything_read_only_and_change_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "a.txt").write_text("alpha\nbeta\n")
    (project / "sub" / "b.txt").write_text("gamma\n")
    os.symlink("a.txt", project / "link")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([project])
    registry = ToolRegistry(dropped)
    before = _snapshot(tmp_path)
    flags_seen: list[int] = []
    real_open = os.open

    def recording_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        flags_seen.append(flags)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", recording_open)
    calls = [("read_file", {"path": "project/a.txt"}), ("read_file", {"path": "project/link"}),
             ("list_folder", {"path": "project", "recursive": True}), ("search_text", {"pattern": "a"}),
             ("file_info", {"path": "project/sub/b.txt"}), ("file_info", {"path": "project"})]
    for name, arguments in calls:
        registry.run(name, arguments)
    monkeypatch.undo()
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    assert flags_seen and all(flags & writing == 0 for flags in flags_seen)
    assert all(flags & os.O_NOFOLLOW for flags in flags_seen)
    assert _snapshot(tmp_path) == before


def test_no_descriptor_is_leaked_by_refusals_or_successes(tmp_path: Path) -> None:
    project = tmp_path / "project"
    (project / "sub").mkdir(parents=True)
    (project / "a.txt").write_text("alpha\n")
    (project / "bin").write_bytes(b"\x00\x01")
    os.symlink("/etc/passwd", project / "out")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([project])
    registry = ToolRegistry(dropped)
    open_before = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None
    if open_before is None:
        pytest.skip("needs /proc/self/fd to count descriptors")
    for _ in range(20):
        for name, arguments in [("read_file", {"path": "project/a.txt"}), ("read_file", {"path": "project/bin"}),
                                ("read_file", {"path": "project/out"}), ("read_file", {"path": "project/sub"}),
                                ("list_folder", {"path": "project/a.txt"}), ("search_text", {"pattern": "x"}),
                                ("file_info", {"path": "project/nope"})]:
            try:
                registry.run(name, arguments)
            except ToolError:
                pass
    assert len(os.listdir("/proc/self/fd")) == open_before
