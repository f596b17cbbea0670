"""The file tools doing their job on legitimate drops: read_file, list_folder, search_text, file_info."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.tools import DroppedFiles, ToolError, ToolLimits, ToolRegistry
from app.tools.identity import birth_time_at

LIMITS = ToolLimits(max_file_bytes=1 << 20, max_read_bytes=4096, max_read_lines=50, search_timeout_s=2.0)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "src" / "main.py").write_text("import pkg\n\ndef main():\n    print('Hello, World')\n")
    (root / "src" / "pkg" / "util.py").write_text("def helper():\n    return 'hello again'\n")
    (root / "README.md").write_text("# Project\nSay hello.\n")
    (root / "numbers.txt").write_text("".join(f"line {n}\n" for n in range(1, 201)))
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main hello\n")
    (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")
    return root


@pytest.fixture
def registry(project: Path) -> ToolRegistry:
    dropped = DroppedFiles(LIMITS)
    accepted, rejected = dropped.drop([project])
    assert [item.name for item in accepted] == ["project"] and rejected == []
    return ToolRegistry(dropped)


def run(registry: ToolRegistry, tool: str, **arguments: object) -> str:
    return registry.run(tool, arguments)


# read_file


def test_read_whole_file_with_header(registry: ToolRegistry) -> None:
    assert run(registry, "read_file", path="project/src/main.py") == (
        "[project/src/main.py: lines 1-4 of 4]\nimport pkg\n\ndef main():\n    print('Hello, World')")


def test_read_line_range(registry: ToolRegistry) -> None:
    result = run(registry, "read_file", path="project/numbers.txt", start_line=10, end_line=12)
    assert result == "[project/numbers.txt: lines 10-12 of 200]\nline 10\nline 11\nline 12"


def test_read_is_cut_at_line_cap_with_a_note_on_how_to_continue(registry: ToolRegistry) -> None:
    result = run(registry, "read_file", path="project/numbers.txt")
    lines = result.splitlines()
    assert lines[0] == "[project/numbers.txt: lines 1-50 of 200]"
    assert lines[1] == "line 1" and lines[50] == "line 50"
    assert lines[-1] == "[Cut at 50 lines. Call read_file with start_line=51 to read on.]"
    assert run(registry, "read_file", path="project/numbers.txt", start_line=51).startswith(
        "[project/numbers.txt: lines 51-100 of 200]\nline 51\n")


def test_read_is_cut_at_byte_cap(project: Path, registry: ToolRegistry) -> None:
    (project / "wide.txt").write_text("".join(f"{n:04d} " + "x" * 995 + "\n" for n in range(10)))
    result = run(registry, "read_file", path="project/wide.txt")
    assert result.splitlines()[0] == "[project/wide.txt: lines 1-4 of 10]"
    assert result.endswith("[Cut at 4.0 KB. Call read_file with start_line=5 to read on.]")
    assert len(result.encode()) < LIMITS.max_read_bytes + 200


def test_one_enormous_line_is_shown_cut(project: Path, registry: ToolRegistry) -> None:
    (project / "min.js").write_text("x" * 100_000)
    result = run(registry, "read_file", path="project/min.js")
    assert result.startswith("[project/min.js: lines 1-1 of 1]\n" + "x" * 4096 + " [line cut here]")
    assert "start_line=2" in result


def test_crlf_and_missing_final_newline(project: Path, registry: ToolRegistry) -> None:
    (project / "dos.txt").write_bytes(b"one\r\ntwo\r\nthree")
    assert run(registry, "read_file", path="project/dos.txt") == "[project/dos.txt: lines 1-3 of 3]\none\ntwo\nthree"


def test_empty_file(project: Path, registry: ToolRegistry) -> None:
    (project / "empty.txt").write_bytes(b"")
    assert run(registry, "read_file", path="project/empty.txt") == "[project/empty.txt: empty file]"


def test_utf8_with_invalid_bytes_after_the_first_block_is_read_with_replacement(project: Path,
                                                                               registry: ToolRegistry) -> None:
    (project / "mixed.txt").write_bytes(b"ok\n" * 5000 + b"bad \xff byte\n")
    result = run(registry, "read_file", path="project/mixed.txt", start_line=5001)
    assert result.endswith("bad \ufffd byte")


@pytest.mark.parametrize(("start", "end", "message"), [
    (500, None, "start_line 500 is past the end of 'project/numbers.txt', which has 200 lines"),
    (5, 4, r"end_line \(4\) is before start_line \(5\)"),
])
def test_bad_line_ranges_are_explained(registry: ToolRegistry, start: int, end: int | None, message: str) -> None:
    arguments: dict[str, object] = {"path": "project/numbers.txt", "start_line": start}
    if end is not None:
        arguments["end_line"] = end
    with pytest.raises(ToolError, match=message):
        registry.run("read_file", arguments)


def test_paths_relative_to_the_single_dropped_folder_are_accepted(registry: ToolRegistry) -> None:
    assert run(registry, "read_file", path="src/pkg/util.py").startswith("[project/src/pkg/util.py: lines 1-2 of 2]")
    with pytest.raises(ToolError, match="There is no 'nothere.py' in 'project/src'"):
        run(registry, "read_file", path="src/nothere.py")


def test_absolute_path_inside_a_dropped_folder(project: Path, registry: ToolRegistry) -> None:
    result = run(registry, "read_file", path=str(project.resolve() / "src" / "main.py"))
    assert result.startswith("[project/src/main.py: lines 1-4 of 4]")


def test_symlink_staying_inside_is_followed(project: Path, registry: ToolRegistry) -> None:
    os.symlink("src/pkg", project / "shortcut")
    os.symlink("../README.md", project / "src" / "readme-link")
    assert "hello again" in run(registry, "read_file", path="project/shortcut/util.py")
    assert run(registry, "read_file", path="project/src/readme-link").startswith("[project/README.md: lines 1-2 of 2]")


def test_symlink_to_another_dropped_item_is_followed(tmp_path: Path, project: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("dropped separately\n")
    os.symlink(notes, project / "notes-link")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([project, notes])
    result = ToolRegistry(dropped).run("read_file", {"path": "project/notes-link"})
    assert result == "[notes.txt: lines 1-1 of 1]\ndropped separately"


def test_dropped_symlink_is_resolved_at_drop_time(tmp_path: Path) -> None:
    target = tmp_path / "real.txt"
    target.write_text("through a link\n")
    os.symlink(target, tmp_path / "alias.txt")
    dropped = DroppedFiles(LIMITS)
    [item], _ = dropped.drop([tmp_path / "alias.txt"])
    assert item.name == "alias.txt" and item.path == str(target.resolve())
    assert ToolRegistry(dropped).run("read_file", {"path": "alias.txt"}).endswith("through a link")


def test_hard_link_to_a_dropped_file_is_allowed(tmp_path: Path, project: Path) -> None:
    os.link(project / "README.md", tmp_path / "readme-copy.md")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([project, tmp_path / "readme-copy.md"])
    assert "Say hello." in ToolRegistry(dropped).run("read_file", {"path": "project/README.md"})


def test_in_place_edit_of_a_dropped_file_is_still_readable(tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("first\n")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([notes])
    with open(notes, "a") as handle:  # same inode: the same file, grown
        handle.write("second\n")
    if birth_time_at(str(notes)) is None:  # no birth time on this file system: an edit means "drop it again"
        with pytest.raises(ToolError, match="changed"):
            ToolRegistry(dropped).run("read_file", {"path": "notes.txt"})
        return
    assert ToolRegistry(dropped).run("read_file", {"path": "notes.txt"}).endswith("first\nsecond")


# list_folder


def test_list_folder_flat(registry: ToolRegistry) -> None:
    assert run(registry, "list_folder", path="project").splitlines() == [
        "[project/: 5 entries]", "project/.git/  (not expanded)", "project/README.md  (21 B)",
        "project/logo.png  (10 B)", "project/numbers.txt  (1.7 KB)", "project/src/"]


def test_list_folder_recursive_skips_tool_folders(registry: ToolRegistry) -> None:
    listing = run(registry, "list_folder", path="project", recursive=True).splitlines()
    assert listing[0] == "[project/: 8 entries, recursive]"
    assert "project/src/pkg/util.py  (39 B)" in listing
    assert "project/.git/  (not expanded)" in listing
    assert not any("HEAD" in line for line in listing)


def test_list_folder_cap(registry: ToolRegistry) -> None:
    listing = run(registry, "list_folder", path="project", recursive=True, max_entries=3).splitlines()
    assert listing[0] == "[project/: 3+ entries, recursive]"
    assert len(listing) == 5 and listing[-1].startswith("[Stopped after 3 entries")


def test_list_folder_without_path_lists_the_drops(registry: ToolRegistry) -> None:
    assert run(registry, "list_folder") == (
        "Files and folders the user dropped (the file tools can open only these and what is inside them):\n"
        "- project/ (folder)")


def test_list_empty_subfolder_and_file_refused(project: Path, registry: ToolRegistry) -> None:
    (project / "empty").mkdir()
    assert run(registry, "list_folder", path="project/empty") == "[project/empty/ is empty]"
    with pytest.raises(ToolError, match="is a file, not a folder"):
        run(registry, "list_folder", path="project/README.md")


# search_text


def test_search_is_case_insensitive_by_default_and_skips_binaries_and_git(registry: ToolRegistry) -> None:
    result = run(registry, "search_text", pattern="HELLO").splitlines()
    assert result[0] == "[3 matching lines for text 'HELLO' in 3 files; 4 files searched]"
    assert result[1:4] == ["project/README.md:2: Say hello.", "project/src/main.py:4: print('Hello, World')",
                           "project/src/pkg/util.py:2: return 'hello again'"]
    assert result[-1] == "[Skipped: 1 binary]"


def test_search_case_sensitive_and_regex(registry: ToolRegistry) -> None:
    assert "1 matching line for" in run(registry, "search_text", pattern="Hello", case_sensitive=True)
    result = run(registry, "search_text", pattern=r"^def \w+\(\):$", regex=True)
    assert result.splitlines()[1:3] == ["project/src/main.py:3: def main():", "project/src/pkg/util.py:1: def helper():"]


def test_search_limited_to_a_path_and_max_results(registry: ToolRegistry) -> None:
    result = run(registry, "search_text", pattern="line", path="project/numbers.txt", max_results=5).splitlines()
    assert result[0].startswith("[5 matching lines")
    assert result[1:6] == [f"project/numbers.txt:{n}: line {n}" for n in range(1, 6)]
    assert result[6].startswith("[Stopped at 5 matches")


def test_search_no_match_is_a_result_not_an_error(registry: ToolRegistry) -> None:
    assert run(registry, "search_text", pattern="zebra") == (
        "[No lines match text 'zebra'; 4 files searched]\n[Skipped: 1 binary]")


def test_search_long_line_excerpt_is_centred_on_match(project: Path, registry: ToolRegistry) -> None:
    (project / "long.txt").write_text("a" * 5000 + "NEEDLE" + "b" * 5000 + "\n")
    hit = run(registry, "search_text", pattern="needle", path="project/long.txt").splitlines()[1]
    assert hit.startswith("project/long.txt:1: …a") and "NEEDLE" in hit and hit.endswith("b…")
    assert len(hit) < 300


def test_search_across_a_dropped_file_and_folder(tmp_path: Path, project: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello from notes\n")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([project, notes])
    result = ToolRegistry(dropped).run("search_text", {"pattern": "hello from"})
    assert result.splitlines()[1] == "notes.txt:1: hello from notes"


# file_info


def test_file_info_for_text_binary_and_folder(registry: ToolRegistry) -> None:
    info = run(registry, "file_info", path="project/numbers.txt").splitlines()
    assert info[0] == "path: project/numbers.txt"
    assert info[1] == "size: 1,692 bytes (1.7 KB)"
    assert info[2].startswith("modified: ")
    assert info[3:] == ["type: text file (UTF-8)", "lines: 200"]
    binary = run(registry, "file_info", path="project/logo.png")
    assert "type: binary file (it contains NUL bytes; read_file will refuse it)" in binary
    folder = run(registry, "file_info", path="project").splitlines()
    assert folder[1:3] == ["type: folder", "entries: 5 (2 folders, 3 other)"]


def test_file_info_on_a_file_over_the_cap_still_reports_size(project: Path, registry: ToolRegistry) -> None:
    with open(project / "big.bin", "wb") as handle:
        handle.truncate(LIMITS.max_file_bytes + 10)
    info = run(registry, "file_info", path="project/big.bin")
    assert "size: 1,048,586 bytes (1.0 MB)" in info and "lines: not counted" in info


def test_paths_spelled_through_a_symlinked_parent_are_accepted(tmp_path: Path, project: Path,
                                                               registry: ToolRegistry) -> None:
    os.symlink(tmp_path, tmp_path / "alias")  # like /tmp -> /private/tmp on macOS
    spelled = tmp_path / "alias" / "project" / "README.md"
    assert run(registry, "read_file", path=str(spelled)).startswith("[project/README.md: lines 1-2 of 2]")
    os.symlink(spelled, project / "via-alias")
    assert run(registry, "read_file", path="project/via-alias").startswith("[project/README.md:")


def test_line_numbers_stay_right_across_read_blocks(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("".join(f"row {n:06d} {'.' * 40}\n" for n in range(1, 60_001)))  # ~3 MB: several blocks
    dropped = DroppedFiles(ToolLimits())
    dropped.drop([big])
    registry = ToolRegistry(dropped)
    found = registry.run("search_text", {"pattern": r"row 0(12345|59999) ", "regex": True}).splitlines()
    assert [line.split(": ", 1)[0] for line in found[1:3]] == ["big.txt:12345", "big.txt:59999"]
    window = registry.run("read_file", {"path": "big.txt", "start_line": 45_000, "end_line": 45_001})
    assert window.splitlines() == ["[big.txt: lines 45000-45001 of 60000]", f"row 045000 {'.' * 40}",
                                   f"row 045001 {'.' * 40}"]


def test_search_reports_each_line_once_and_handles_crlf(project: Path, registry: ToolRegistry) -> None:
    (project / "dos.txt").write_bytes(b"ab ab ab\r\nno\r\nend ab\r\n")
    result = run(registry, "search_text", pattern="ab$", regex=True, path="project/dos.txt").splitlines()
    assert result[1:] == ["project/dos.txt:1: ab ab ab", "project/dos.txt:3: end ab"]  # '$' before CRLF
    result = run(registry, "search_text", pattern="ab", path="project/dos.txt").splitlines()
    assert result[1:] == ["project/dos.txt:1: ab ab ab", "project/dos.txt:3: end ab"]
