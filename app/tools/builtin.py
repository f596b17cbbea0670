"""The built-in file tools: read_file, list_folder, search_text, file_info. Read-only, sandboxed to drops."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import re2

from app.tools.errors import ToolError
from app.tools.identity import birth_time_at, birth_time_of_fd
from app.tools.limits import ToolLimits, human_size
from app.tools.names import shown
from app.tools.sandbox import DroppedFiles, OpenedPath, kind_of
from app.tools.textfile import (
    block_line_count,
    count_newlines,
    decode_line,
    iter_line_blocks,
    sniff_fd,
    split_raw_lines,
)
from app.tools.walking import SKIPPED_FOLDERS, WalkEntry, walk_folder

MAX_PATTERN_CHARS = 1000
# RE2 (no backtracking: time linear in the text) may use this much memory per compiled pattern; a
# pattern whose program does not fit is refused when compiled, its DFA falls back to the NFA.
PATTERN_MEMORY_BYTES = 8 * 2**20  # RE2's default; 32 MB let one pattern take 2.4 s to compile
MAX_EXCERPT_CHARS = 240
DEFAULT_LIST_ENTRIES = 200
DEFAULT_SEARCH_RESULTS = 50


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}" if number == 1 else f"{number:,} {noun}s"


def _line_total(opened: OpenedPath, consumed: int, lines_seen: int, limit: int) -> int:
    """Total lines of the file: `lines_seen` in the first `consumed` bytes plus those counted after them."""
    more, ends_with_newline = count_newlines(opened.fd, consumed, limit)
    size = min(opened.stat.st_size, limit)
    partial_last = 1 if size > consumed and not ends_with_newline else 0
    return lines_seen + more + partial_last


@dataclass
class _LineWindow:
    """The lines read_file keeps, and where reading stopped."""

    kept: list[str] = field(default_factory=list)
    kept_bytes: int = 0
    lines_passed: int = 0  # lines read through, kept or not
    bytes_passed: int = 0
    cut: str | None = None  # why output stopped early ("2,000 lines", "256.0 KB")


def _read_window(fd: int, start_line: int, end_line: int | None, limits: ToolLimits) -> _LineWindow:
    window = _LineWindow()
    for block in iter_line_blocks(fd, limits.max_file_bytes):
        block_lines = block_line_count(block)
        if window.lines_passed + block_lines < start_line:  # the whole block lies before the range: skip it
            window.lines_passed += block_lines
            window.bytes_passed += len(block)
            continue
        for raw in split_raw_lines(block):
            if window.lines_passed + 1 >= start_line:
                if len(window.kept) >= limits.max_read_lines:
                    window.cut = f"{limits.max_read_lines:,} lines"
                    return window
                if window.kept_bytes + len(raw) > limits.max_read_bytes:
                    window.cut = human_size(limits.max_read_bytes)
                    if not window.kept:  # one enormous line: show its beginning rather than nothing
                        window.kept.append(decode_line(raw[: limits.max_read_bytes]) + " [line cut here]")
                        window.lines_passed += 1
                        window.bytes_passed += len(raw)
                    return window
                window.kept.append(decode_line(raw))
                window.kept_bytes += len(raw)
            window.lines_passed += 1
            window.bytes_passed += len(raw)
            if end_line is not None and window.lines_passed >= end_line:
                return window
    return window


def read_file(dropped: DroppedFiles, path: str, start_line: int = 1, end_line: int | None = None) -> str:
    """Lines start_line..end_line (1-based, inclusive) of a dropped text file, capped in lines and bytes."""
    limits = dropped.limits
    if start_line < 1:
        raise ToolError(f"start_line must be 1 or more, not {start_line}.")
    if end_line is not None and end_line < start_line:
        raise ToolError(f"end_line ({end_line}) is before start_line ({start_line}).")
    with dropped.open_file(path) as opened:
        window = _read_window(opened.fd, start_line, end_line, limits)
        total = _line_total(opened, window.bytes_passed, window.lines_passed, limits.max_file_bytes)
        if total == 0:
            return f"[{opened.shown}: empty file]"
        if start_line > total:
            raise ToolError(f"start_line {start_line} is past the end of '{opened.shown}', which has {total} lines.")
        first, last = start_line, start_line + len(window.kept) - 1
        parts = [f"[{opened.shown}: lines {first}-{last} of {total}]", *window.kept]
        if window.cut is not None:
            parts.append(f"[Cut at {window.cut}. Call read_file with start_line={last + 1} to read on.]")
        elif opened.stat.st_size > limits.max_file_bytes:
            parts.append(f"[Only the first {human_size(limits.max_file_bytes)} of the file can be read.]")
        return "\n".join(parts)


def _describe_entry(entry: WalkEntry, dropped: DroppedFiles) -> str:
    info = entry.stat
    if info is None:
        return f"{entry.shown}  (could not be examined)"
    notes = []
    if entry.other_device:
        notes.append("another disk mounted here, not opened")
    if entry.is_folder:
        line = f"{entry.shown}/"
        if entry.name in SKIPPED_FOLDERS:
            notes.append("not expanded")
    elif entry.is_symlink:
        try:
            target = os.readlink(entry.name, dir_fd=entry.parent_fd)
        except OSError:
            target = "?"
        line = f"{entry.shown} -> {shown(target)}"
        notes.append("symbolic link")
    elif entry.is_file:
        line = entry.shown
        notes.append(human_size(info.st_size))
        if info.st_nlink > 1 and not dropped.is_dropped_file(info, birth_time_at(entry.name, entry.parent_fd)):
            notes.append("hard link, not readable")
    else:
        line = entry.shown
        notes.append(f"{kind_of(info.st_mode)}, not readable")
    if entry.has_unsafe_name:
        notes.append("name has hidden or control characters, not readable")
    return f"{line}  ({', '.join(notes)})" if notes else line


def list_folder(dropped: DroppedFiles, path: str = "", recursive: bool = False,
                max_entries: int = DEFAULT_LIST_ENTRIES) -> str:
    """The entries of a dropped folder (or of the drops themselves when path is empty), one per line."""
    if not path.strip():
        return dropped.describe_for_model()
    cap = max(1, min(max_entries, dropped.limits.max_list_entries))
    with dropped.open_folder(path) as opened:
        lines: list[str] = []
        more = False
        for entry in walk_folder(opened.fd, opened.shown, recursive):
            if len(lines) == cap:
                more = True
                break
            lines.append(_describe_entry(entry, dropped))
    if not lines:
        return f"[{opened.shown}/ is empty]"
    header = f"[{opened.shown}/: {len(lines)}{'+' if more else ''} entries{', recursive' if recursive else ''}]"
    footer = [(f"[Stopped after {cap} entries; list a subfolder or raise max_entries "
               f"(up to {dropped.limits.max_list_entries}).]")] if more else []
    return "\n".join([header, *lines, *footer])


Finder = Callable[[bytes, int], "tuple[int, int] | None"]


def _make_finder(pattern: str, is_regex: bool, case_sensitive: bool) -> Finder:
    """A function giving the (start, end) byte span of the first match at or after a position, or None.

    Patterns run on RE2, whose matching takes time linear in the text and memory bounded by
    PATTERN_MEMORY_BYTES, whatever the pattern (no catastrophic backtracking, no recursion); the
    price is RE2's syntax: no backreferences, lookaround or recursion.
    """
    options = re2.Options()
    options.case_sensitive = case_sensitive
    options.log_errors = False
    options.max_mem = PATTERN_MEMORY_BYTES
    options.literal = not is_regex
    try:
        compiled = re2.compile(pattern if not is_regex else "(?m)" + pattern, options)
    except re2.error as error:
        problem = error.args[0].decode(errors="replace") if error.args and isinstance(error.args[0], bytes) else error
        raise ToolError(f"'{shown(pattern)}' is not a valid regular expression: {problem}. (Patterns use RE2 "
                        "syntax: no backreferences, lookaround or recursion.)") from None

    def find(data: bytes, pos: int) -> tuple[int, int] | None:
        found = compiled.search(data, pos)
        return None if found is None else found.span()

    return find


def _excerpt(line: str, span: tuple[int, int]) -> str:
    text = line.strip()
    if len(text) <= MAX_EXCERPT_CHARS:
        return text
    offset = len(line) - len(line.lstrip())
    start = max(0, span[0] - offset - MAX_EXCERPT_CHARS // 3)
    piece = text[start: start + MAX_EXCERPT_CHARS]
    return ("…" if start > 0 else "") + piece + ("…" if start + MAX_EXCERPT_CHARS < len(text) else "")


@dataclass
class _Search:
    dropped: DroppedFiles
    find: Finder
    max_results: int
    deadline: float
    matches: list[str] = field(default_factory=list)
    files_searched: int = 0
    files_matched: int = 0
    bytes_read: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    stop_reason: str | None = None

    def skip(self, why: str) -> None:
        self.skipped[why] = self.skipped.get(why, 0) + 1

    def search_fd(self, fd: int, info: os.stat_result, shown_path: str, inside_folder: bool) -> None:
        limits = self.dropped.limits
        if info.st_size > limits.max_file_bytes:
            return self.skip(f"over {human_size(limits.max_file_bytes)}")
        if inside_folder and info.st_nlink > 1 and not self.dropped.is_dropped_file(info, birth_time_of_fd(fd)):
            return self.skip("hard-linked")
        if self.files_searched >= limits.max_search_files or self.bytes_read + info.st_size > limits.max_search_bytes:
            self.stop_reason = (f"Stopped after {self.files_searched} files ({human_size(self.bytes_read)}); "
                                "search a smaller folder.")
            return None
        if sniff_fd(fd, info.st_size, limits.sniff_bytes) is not None:
            return self.skip("binary")
        self.files_searched += 1
        self.bytes_read += info.st_size
        matched_before = len(self.matches)
        lines_before = 0  # lines in the blocks already searched
        # Whole blocks are searched at once (one pass, not one per line); a match is reported on the
        # line where it starts, once per line.
        for block in iter_line_blocks(fd, limits.max_file_bytes):
            data = block.replace(b"\r\n", b"\n")
            counted_to = 0
            position = 0
            while position < len(data):
                if time.monotonic() > self.deadline:
                    raise TimeoutError
                span = self.find(data, position)
                if span is None:
                    break
                start, end = span
                lines_before += data.count(b"\n", counted_to, start)
                counted_to = start
                line_start = data.rfind(b"\n", 0, start) + 1
                line_end = data.find(b"\n", start)
                line_end = len(data) if line_end < 0 else line_end
                line = data[line_start:line_end]
                char_span = (len(decode_line(line[: start - line_start])), len(decode_line(line[: end - line_start])))
                self.matches.append(f"{shown_path}:{lines_before + 1}: {_excerpt(decode_line(line), char_span)}")
                position = line_end + 1  # one report per line: go on from the next line
                if len(self.matches) >= self.max_results:
                    self.stop_reason = (f"Stopped at {self.max_results} matches; narrow the search or raise "
                                        f"max_results (up to {limits.max_search_results}).")
                    break
            if self.stop_reason is not None:
                break
            lines_before += data.count(b"\n", counted_to)
        if len(self.matches) > matched_before:
            self.files_matched += 1
        return None

    def search_opened(self, opened: OpenedPath) -> None:
        if not opened.is_folder:
            return self.search_fd(opened.fd, opened.stat, opened.shown, inside_folder=opened.inside_folder)
        for entry in walk_folder(opened.fd, opened.shown, recursive=True):
            if self.stop_reason is not None:
                return None
            if time.monotonic() > self.deadline:  # also bounds walks over many skipped files
                raise TimeoutError
            if entry.is_symlink:
                self.skip("symbolic link")
            elif entry.other_device:
                self.skip("on another disk")
            elif entry.is_file and entry.has_unsafe_name:
                self.skip("hidden characters in name")
            elif entry.is_file:
                assert entry.stat is not None
                try:
                    fd = entry.open_file()
                except OSError:
                    self.skip("unreadable")
                    continue
                try:
                    self.search_fd(fd, entry.stat, entry.shown, inside_folder=True)
                finally:
                    os.close(fd)
        return None


def search_text(dropped: DroppedFiles, pattern: str, path: str = "", regex: bool = False,
                case_sensitive: bool = False, max_results: int = DEFAULT_SEARCH_RESULTS) -> str:
    """Lines matching a substring or regular expression across dropped files and folders, as file:line: text."""
    limits = dropped.limits
    if not pattern:
        raise ToolError("The search pattern is empty; give the text or regular expression to look for.")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ToolError(f"The search pattern is {len(pattern)} characters long; the limit is {MAX_PATTERN_CHARS}.")
    search = _Search(dropped, _make_finder(pattern, regex, case_sensitive),
                     max(1, min(max_results, limits.max_search_results)), time.monotonic() + limits.search_timeout_s)
    targets = [path] if path.strip() else [item.name for item in dropped.items()]
    if not targets:
        raise ToolError("No files or folders have been dropped, so there is nothing to search. Ask the user to "
                        "drop the files you need onto the MoeBar window.")
    try:
        for target in targets:
            if search.stop_reason is not None:
                break
            try:
                opened = dropped.open(target)
            except ToolError as error:
                if path.strip():
                    raise
                search.skip(f"refused ({error})")
                continue
            with opened:
                search.search_opened(opened)
    except TimeoutError:
        if not search.matches:
            raise ToolError(f"The search for '{shown(pattern)}' took longer than {limits.search_timeout_s:g} s and was "
                            "stopped. Use a simpler pattern or search a smaller folder.") from None
        search.stop_reason = f"Stopped after {limits.search_timeout_s:g} s; results are incomplete."
    kind = "regular expression" if regex else "text"
    if search.matches:
        lines = [(f"[{_count(len(search.matches), 'matching line')} for {kind} '{shown(pattern)}' in "
                  f"{_count(search.files_matched, 'file')}; {_count(search.files_searched, 'file')} searched]"),
                 *search.matches]
    else:
        lines = [f"[No lines match {kind} '{shown(pattern)}'; {_count(search.files_searched, 'file')} searched]"]
    if search.stop_reason:
        lines.append(f"[{search.stop_reason}]")
    if search.skipped:
        lines.append("[Skipped: " + ", ".join(f"{count} {why}" for why, count in sorted(search.skipped.items())) + "]")
    return "\n".join(lines)


def file_info(dropped: DroppedFiles, path: str) -> str:
    """Size, modification time, type and line count of a dropped file or folder."""
    limits = dropped.limits
    with dropped.open(path) as opened:
        info = opened.stat
        modified = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(info.st_mtime))
        lines = [f"path: {opened.shown}"]
        if opened.is_folder:
            names = os.listdir(opened.fd)
            folders = sum(1 for name in names if _is_folder_at(opened.fd, name))
            lines += ["type: folder",
                      f"entries: {len(names)} ({_count(folders, 'folder')}, {len(names) - folders} other)",
                      f"modified: {modified}"]
            return "\n".join(lines)
        size = info.st_size
        lines.append(f"size: {size:,} bytes ({human_size(size)})")
        lines.append(f"modified: {modified}")
        if size > limits.max_file_bytes:
            lines += ["type: file", f"lines: not counted (over the {human_size(limits.max_file_bytes)} limit)"]
            return "\n".join(lines)
        problem = sniff_fd(opened.fd, size, limits.sniff_bytes)
        if problem is not None:
            lines.append(f"type: binary file (it {problem}; read_file will refuse it)")
            return "\n".join(lines)
        newlines, ends_with_newline = count_newlines(opened.fd, 0, limits.max_file_bytes)
        line_count = newlines + (0 if size == 0 or ends_with_newline else 1)
        lines += ["type: text file (UTF-8)", f"lines: {line_count:,}"]
        return "\n".join(lines)


def _is_folder_at(folder_fd: int, name: str) -> bool:
    try:
        return stat.S_ISDIR(os.stat(name, dir_fd=folder_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False
