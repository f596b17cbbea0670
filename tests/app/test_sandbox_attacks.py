"""Attacks on the file-tool sandbox: every one must be refused with a ToolError that says why.

The world: a dropped folder `project/`, a dropped file `notes.txt`, and an `outside/` folder with
secrets that no tool may ever show. Each case optionally changes the world after the drop, then
calls a tool through the registry, as the model would.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.tools import (
    REASON_BINARY,
    REASON_NOT_FILE_OR_FOLDER,
    REASON_TOO_BIG,
    REASON_UNREADABLE,
    DroppedFiles,
    ToolError,
    ToolLimits,
    ToolRegistry,
    classify_drop,
)

SECRET = "TOP SECRET 4242"
LIMITS = ToolLimits(max_file_bytes=1 << 20, search_timeout_s=0.5)

# Side effects the tools must never have, seen through Python's audit hooks (PEP 578): opening
# for writing, changing the file system, starting programs, signals, network, native libraries.
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
FORBIDDEN_EVENTS = {
    "os.remove", "os.rmdir", "os.rename", "os.mkdir", "os.symlink", "os.link", "os.chmod", "os.chown",
    "os.chflags", "os.truncate", "os.utime", "os.setxattr", "os.removexattr", "os.putenv", "os.unsetenv",
    "os.system", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.startfile", "subprocess.Popen", "pty.spawn",
    "shutil.rmtree", "shutil.move", "shutil.copyfile", "shutil.copymode", "shutil.copystat", "shutil.chown",
    "socket.connect", "socket.bind", "socket.sendto", "ctypes.dlopen", "tempfile.mkstemp", "tempfile.mkdtemp",
}  # fmt: skip
_recording: list[tuple[str, tuple[Any, ...]]] | None = None


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _recording is None:
        return
    if event == "open":
        _path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & WRITE_FLAGS:
            _recording.append((event, args))
    elif event in FORBIDDEN_EVENTS or event.startswith(("os.exec", "os.spawn", "os.posix_spawn")):
        _recording.append((event, args))


sys.addaudithook(_audit)  # cannot be removed; it does nothing unless a test is recording


def run_recording_side_effects(registry: ToolRegistry, tool: str, args: Any) -> tuple[Any, list[tuple[str, Any]]]:
    """Run a tool; return its result (or the ToolError raised) and the forbidden side effects seen."""
    global _recording
    _recording = []
    try:
        try:
            result: Any = registry.run(tool, args)
        except ToolError as error:
            result = error
        return result, list(_recording)
    finally:
        _recording = None


@dataclass
class World:
    root: Path
    project: Path
    notes: Path
    outside: Path
    dropped: DroppedFiles
    registry: ToolRegistry


@pytest.fixture
def world(tmp_path: Path) -> World:
    root = tmp_path.resolve()
    outside = root / "outside"
    (outside / "dir").mkdir(parents=True)
    (outside / "secret.txt").write_text(f"{SECRET}\n")
    (outside / "dir" / "secret2.txt").write_text(f"{SECRET} two\n")
    project = root / "project"
    (project / "sub").mkdir(parents=True)
    (project / "a.txt").write_text("alpha\n")
    (project / "sub" / "b.txt").write_text("beta\n")
    (project / "caf\u00e9.txt").write_text("composed name\n")
    (root / "project-evil").mkdir()
    (root / "project-evil" / "x.txt").write_text(f"{SECRET}\n")
    notes = root / "notes.txt"
    notes.write_text("my notes\n")
    dropped = DroppedFiles(LIMITS)
    accepted, rejected = dropped.drop([project, notes])
    assert len(accepted) == 2 and rejected == []
    return World(root, project, notes, outside, dropped, ToolRegistry(dropped))


def _symlink(name: str, target: str | Callable[[World], str]) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.project / name).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(target(w) if callable(target) else target, w.project / name)
    return setup


def _write(name: str, data: bytes) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.project / name).write_bytes(data)
    return setup


def _replace_notes_with_symlink(w: World) -> None:
    w.notes.unlink()
    os.symlink(w.outside / "secret.txt", w.notes)


def _replace_notes_with_other_file(w: World) -> None:
    other = w.root / "other.txt"
    other.write_text(f"{SECRET}\n")
    os.replace(other, w.notes)


def _replace_project_with_symlink(w: World) -> None:
    w.project.rename(w.root / "project.old")
    os.symlink(w.outside, w.project)


def _replace_project_with_other_folder(w: World) -> None:
    w.project.rename(w.root / "project.old")
    w.project.mkdir()
    (w.project / "secret.txt").write_text(f"{SECRET}\n")


def _swap_subfolder_for_symlink(w: World) -> None:
    (w.project / "sub").rename(w.project / "sub.old")
    os.symlink(w.outside / "dir", w.project / "sub")


def _hard_link(name: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        os.link(w.outside / "secret.txt", w.project / name)
    return setup


def _fifo(w: World) -> None:
    os.mkfifo(w.project / "pipe")


def _unix_socket(w: World) -> None:
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(w.project / "sock"))
    w.__dict__["socket"] = server  # keep it bound for the duration of the test


def _device(kind: int, major: int, minor: int) -> Callable[[World], None]:
    def setup(w: World) -> None:
        try:
            os.mknod(w.project / "device", kind | 0o600, os.makedev(major, minor))
        except PermissionError:
            pytest.skip("creating device files needs root")
    return setup


def _huge_sparse_file(w: World) -> None:
    with open(w.project / "huge.log", "wb") as handle:
        handle.truncate(LIMITS.max_file_bytes + 1)


def _named(name: str) -> Callable[[World], None]:
    def setup(w: World) -> None:
        (w.project / name).write_text(f"{SECRET}\n")
    return setup


def _raw_byte_name(w: World) -> None:
    with open(os.path.join(os.fsencode(w.project), b"\xff.txt"), "wb") as handle:
        handle.write(SECRET.encode())


@dataclass(frozen=True)
class Attack:
    id: str
    tool: str
    args: dict[str, Any] | Callable[[World], dict[str, Any]]
    expect: str
    setup: Callable[[World], None] | None = None


ATTACKS = [
    # Path traversal with '..'
    Attack("dotdot-simple", "read_file", {"path": "project/../outside/secret.txt"}, r"contains '\.\.'"),
    Attack("dotdot-nested", "read_file", {"path": "project/sub/../../outside/secret.txt"}, r"contains '\.\.'"),
    Attack("dotdot-leading", "read_file", {"path": "../outside/secret.txt"}, r"contains '\.\.'"),
    Attack("dotdot-alone", "list_folder", {"path": ".."}, r"contains '\.\.'"),
    Attack("dotdot-absolute", "read_file", lambda w: {"path": f"{w.project}/../outside/secret.txt"},
           r"contains '\.\.'"),
    Attack("dotdot-search-path", "search_text", {"pattern": "SECRET", "path": "project/.."}, r"contains '\.\.'"),
    # Absolute paths outside the drops
    Attack("absolute-outside", "read_file", lambda w: {"path": str(w.outside / "secret.txt")}, "not inside any"),
    Attack("absolute-etc-passwd", "read_file", {"path": "/etc/passwd"}, "not inside any"),
    Attack("absolute-double-slash", "read_file", {"path": "//etc//passwd"}, "not inside any"),
    Attack("absolute-sibling-prefix", "read_file", lambda w: {"path": str(w.root / "project-evil" / "x.txt")},
           "not inside any"),
    Attack("absolute-parent-of-drop", "list_folder", lambda w: {"path": str(w.root)}, "not inside any"),
    Attack("absolute-filesystem-root", "list_folder", {"path": "/"}, "not inside any"),
    Attack("file-info-outside", "file_info", {"path": "/etc/hostname"}, "not inside any"),
    Attack("search-outside-path", "search_text", lambda w: {"pattern": "SECRET", "path": str(w.outside)},
           "not inside any"),
    # Names that are not dropped items
    Attack("relative-not-dropped", "read_file", {"path": "secret.txt"}, "not a dropped file or folder"),
    Attack("tilde-home", "read_file", {"path": "~/.ssh/id_rsa"}, "not a dropped file or folder"),
    Attack("file-url", "read_file", {"path": "file:///etc/passwd"}, "not a dropped file or folder"),
    Attack("backslash-traversal", "read_file", {"path": "project\\..\\outside\\secret.txt"},
           "not a dropped file or folder"),
    # Symbolic links leading out
    Attack("symlink-absolute-out", "read_file", {"path": "project/link"}, "symbolic link to .* outside",
           _symlink("link", lambda w: str(w.outside / "secret.txt"))),
    Attack("symlink-relative-out", "read_file", {"path": "project/link"}, "symbolic link to .* outside",
           _symlink("link", "../outside/secret.txt")),
    Attack("symlink-folder-out", "read_file", {"path": "project/linkdir/secret2.txt"}, "symbolic link to .* outside",
           _symlink("linkdir", lambda w: str(w.outside / "dir"))),
    Attack("symlink-deep-dotdot-out", "read_file", {"path": "project/sub/up"}, "symbolic link to .* outside",
           _symlink("sub/up", "../../outside/secret.txt")),
    Attack("symlink-chain-out", "read_file", {"path": "project/l1"}, "symbolic link to .* outside",
           lambda w: (_symlink("l2", str(w.outside / "secret.txt"))(w), _symlink("l1", "l2")(w))),
    Attack("symlink-loop", "read_file", {"path": "project/loop1"}, "more than 16 symbolic links",
           lambda w: (_symlink("loop1", "loop2")(w), _symlink("loop2", "loop1")(w))),
    Attack("symlink-self", "read_file", {"path": "project/self"}, "more than 16 symbolic links",
           _symlink("self", "self")),
    Attack("symlink-to-root", "read_file", {"path": "project/root/etc/passwd"}, "symbolic link to '/'",
           _symlink("root", "/")),
    Attack("symlink-to-proc", "read_file", {"path": "project/env"}, "symbolic link to .* outside",
           _symlink("env", "/proc/self/environ")),
    Attack("symlink-file-info", "file_info", {"path": "project/link"}, "symbolic link to .* outside",
           _symlink("link", lambda w: str(w.outside / "secret.txt"))),
    Attack("symlink-list-folder", "list_folder", {"path": "project/linkdir"}, "symbolic link to .* outside",
           _symlink("linkdir", lambda w: str(w.outside))),
    # Dropped items changed after the drop (identity checks at use time)
    Attack("dropped-file-now-symlink", "read_file", {"path": "notes.txt"}, "replaced by a symbolic link",
           _replace_notes_with_symlink),
    Attack("dropped-file-replaced", "read_file", {"path": "notes.txt"}, "replaced by a different file",
           _replace_notes_with_other_file),
    Attack("dropped-file-deleted", "read_file", {"path": "notes.txt"}, "no longer exists",
           lambda w: w.notes.unlink()),
    Attack("dropped-folder-now-symlink", "read_file", {"path": "project/secret.txt"}, "replaced by a symbolic link",
           _replace_project_with_symlink),
    Attack("dropped-folder-replaced", "read_file", {"path": "project/secret.txt"}, "replaced by a different file",
           _replace_project_with_other_folder),
    Attack("subfolder-swapped-for-symlink", "read_file", {"path": "project/sub/secret2.txt"},
           "symbolic link to .* outside", _swap_subfolder_for_symlink),
    # Hard links to files outside
    Attack("hard-link", "read_file", {"path": "project/hard.txt"}, "hard links", _hard_link("hard.txt")),
    Attack("hard-link-in-subfolder", "read_file", {"path": "project/sub/hard.txt"}, "hard links",
           _hard_link("sub/hard.txt")),
    Attack("hard-link-file-info", "file_info", {"path": "project/hard.txt"}, "hard links", _hard_link("hard.txt")),
    # Special files and system paths
    Attack("fifo", "read_file", {"path": "project/pipe"}, r"named pipe \(FIFO\)", _fifo),
    Attack("unix-socket", "read_file", {"path": "project/sock"}, "socket", _unix_socket),
    Attack("character-device", "read_file", {"path": "project/device"}, "character device",
           _device(stat.S_IFCHR, 1, 3)),
    Attack("block-device", "file_info", {"path": "project/device"}, "block device", _device(stat.S_IFBLK, 7, 0)),
    Attack("proc-environ", "read_file", {"path": "/proc/self/environ"}, "system file"),
    Attack("proc-listing", "list_folder", {"path": "/proc/self"}, "system file"),
    Attack("sys-file", "read_file", {"path": "/sys/kernel/hostname"}, "system file"),
    Attack("dev-zero", "read_file", {"path": "/dev/zero"}, "system file"),
    Attack("dev-urandom-info", "file_info", {"path": "/dev/urandom"}, "system file"),
    # Content that is not text, or too much of it
    Attack("huge-file", "read_file", {"path": "project/huge.log"}, "too big", _huge_sparse_file),
    Attack("binary-nul", "read_file", {"path": "project/blob.bin"}, "binary file.*NUL",
           _write("blob.bin", b"\x7fELF\x02\x01\x01\x00\x00" + SECRET.encode())),
    Attack("binary-png", "read_file", {"path": "project/img.png"}, "binary file",
           _write("img.png", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")),
    Attack("not-utf8", "read_file", {"path": "project/latin1.txt"}, "not UTF-8",
           _write("latin1.txt", b"caf\xe9 " + SECRET.encode())),
    Attack("folder-read-as-file", "read_file", {"path": "project/sub"}, "is a folder, not a file"),
    Attack("path-through-file", "read_file", {"path": "notes.txt/secret.txt"}, "is a file, not a folder"),
    # Hidden characters and lookalike names
    Attack("nul-in-name", "read_file", {"path": "project/a.txt\x00.png"}, "NUL character"),
    Attack("newline-in-name", "read_file", {"path": "project/a\n.txt"}, r"control character \(U\+000A\)",
           _named("a\n.txt")),
    Attack("escape-in-name", "read_file", {"path": "project/\x1b[31mred.txt"}, r"control character \(U\+001B\)"),
    Attack("bidi-override", "read_file", {"path": "project/\u202etxt.exe"}, r"bidirectional text control \(U\+202E\)",
           _named("\u202etxt.exe")),
    Attack("bidi-isolate", "read_file", {"path": "project/\u2066a.txt"}, r"bidirectional text control \(U\+2066\)"),
    Attack("zero-width-space", "read_file", {"path": "project/a\u200b.txt"}, r"invisible formatting character"),
    Attack("byte-order-mark", "read_file", {"path": "\ufeffproject/a.txt"}, r"invisible formatting character"),
    Attack("line-separator", "read_file", {"path": "project/a\u2028.txt"}, "line or paragraph separator"),
    Attack("lone-surrogate", "read_file", {"path": "project/\udcff.txt"}, "undecodable byte or lone surrogate",
           _raw_byte_name),
    Attack("nfd-lookalike", "read_file", {"path": "project/cafe\u0301.txt"}, "differs only in Unicode normalization"),
    Attack("case-lookalike", "read_file", {"path": "project/A.TXT"}, "differs only in letter case"),
    Attack("fullwidth-lookalike", "read_file", {"path": "project/\uff41.txt"}, "differs only in lookalike characters"),
    Attack("dropped-name-case", "read_file", {"path": "Project/a.txt"}, "differs only in letter case"),
    # Malformed arguments
    Attack("empty-path", "read_file", {"path": ""}, "path is empty"),
    Attack("dot-path", "read_file", {"path": "./"}, "names no file or folder"),
    Attack("very-long-path", "read_file", {"path": "project/" + "a" * 5000}, "limit is 4096"),
    Attack("unknown-tool", "delete_file", {"path": "notes.txt"}, "no tool called 'delete_file'"),
    Attack("write-argument", "read_file", {"path": "notes.txt", "mode": "w"}, "does not take the argument 'mode'"),
    Attack("path-not-string", "read_file", {"path": ["notes.txt"]}, "must be text"),
    Attack("line-is-bool", "read_file", {"path": "notes.txt", "start_line": True}, "must be a whole number"),
    Attack("line-is-infinite", "read_file", {"path": "notes.txt", "start_line": float("inf")}, "must be a whole number"),
    Attack("line-negative", "read_file", {"path": "notes.txt", "start_line": -5}, "at least 1"),
    # Denial of service through the search
    Attack("recursive-regex", "search_text", {"pattern": "(a|(?R))+", "regex": True}, "not a valid regular expression"),
    Attack("backreference-regex", "search_text", {"pattern": r"(a+)+\1$", "regex": True},
           "not a valid regular expression.*RE2"),
    Attack("regex-nested-repeat", "search_text", {"pattern": "((((a{100}){100}){100}){100})", "regex": True},
           "invalid repetition size"),
    Attack("regex-program-too-big", "search_text", {"pattern": r"\pL{1000}", "regex": True}, "pattern too large"),
    Attack("invalid-regex", "search_text", {"pattern": "([", "regex": True}, "not a valid regular expression"),
    Attack("regex-huge-repeat", "search_text", {"pattern": "a{1001}", "regex": True}, "invalid repetition size"),
]


def test_there_are_at_least_forty_distinct_attacks() -> None:
    ids = [attack.id for attack in ATTACKS]
    assert len(ids) == len(set(ids)) and len(ids) >= 40


@pytest.mark.parametrize("attack", ATTACKS, ids=[attack.id for attack in ATTACKS])
def test_attack_is_refused_with_a_reason(world: World, attack: Attack) -> None:
    if attack.setup is not None:
        attack.setup(world)
    args = attack.args(world) if callable(attack.args) else attack.args
    result, side_effects = run_recording_side_effects(world.registry, attack.tool, args)
    assert side_effects == []  # refused without writing, deleting or running anything
    assert isinstance(result, ToolError), result
    message = str(result)
    assert SECRET not in message
    assert pytest.importorskip("re").search(attack.expect, message), message
    assert len(message) < 1000


PATHOLOGICAL_PATTERNS = ["(a|aa)+$", "(a*)*b", "(x+x+)+y", "(.*a){20}b", "^(a?){30}a{30}$", "(\\w+\\s?)*#$"]


@pytest.mark.parametrize("pattern", PATHOLOGICAL_PATTERNS)
def test_backtracking_patterns_run_in_linear_time(world: World, pattern: str) -> None:
    """Patterns that take exponential time on a backtracking engine finish well inside the 0.5 s budget."""
    (world.project / "aaa.txt").write_text(("a" * 5000 + "!\n") * 40)
    result = world.registry.run("search_text", {"pattern": pattern, "regex": True, "path": "project/aaa.txt"})
    assert result.startswith("[No lines match regular expression"), result[:300]


def test_a_tool_that_raises_anything_gives_a_tool_error(world: World) -> None:
    from app.tools.registry import BUILTIN_TOOLS, ToolSpec

    def exhausts_memory(dropped: DroppedFiles, **_: Any) -> str:
        raise MemoryError("simulated")

    def has_a_bug(dropped: DroppedFiles, **_: Any) -> str:
        return str(1 // 0)

    tools = (*BUILTIN_TOOLS, ToolSpec("greedy", "x", BUILTIN_TOOLS[0].parameters, exhausts_memory),
             ToolSpec("buggy", "x", BUILTIN_TOOLS[0].parameters, has_a_bug))
    registry = ToolRegistry(world.dropped, tools)
    with pytest.raises(ToolError, match="greedy failed: MemoryError: simulated"):
        registry.run("greedy", {"path": "notes.txt"})
    with pytest.raises(ToolError, match="buggy failed: ZeroDivisionError"):
        registry.run("buggy", {"path": "notes.txt"})


def _all_traps(w: World) -> None:
    for setup in (_symlink("link", lambda w: str(w.outside / "secret.txt")), _symlink("linkdir", lambda w: str(w.outside)),
                  _hard_link("hard.txt"), _fifo, _named("\u202etxt.exe"), _raw_byte_name):
        setup(w)


def test_the_audit_hook_sees_writes_deletes_and_programs(tmp_path: Path) -> None:
    """The side-effect check itself: a tool that writes, deletes or runs a program is caught."""
    import subprocess

    class Misbehaving(ToolRegistry):
        def run(self, name: str, arguments: Any) -> str:  # type: ignore[override]
            (tmp_path / "written.txt").write_text("x")
            os.remove(tmp_path / "written.txt")
            subprocess.run(["true"], check=False)
            return "done"

    _, side_effects = run_recording_side_effects(Misbehaving(DroppedFiles(LIMITS)), "read_file", {})
    events = [event for event, _ in side_effects]
    assert events[0] == "open" and "os.remove" in events and "subprocess.Popen" in events


def test_searching_everything_never_reveals_outside_content(world: World) -> None:
    _all_traps(world)
    for tool, args in [("search_text", {"pattern": "SECRET"}), ("list_folder", {"path": "project", "recursive": True}),
                       ("read_file", {"path": "project/a.txt"}), ("file_info", {"path": "project"})]:  # fmt: skip
        answer, side_effects = run_recording_side_effects(world.registry, tool, args)
        assert side_effects == [] and isinstance(answer, str), (tool, answer, side_effects)
    result = world.registry.run("search_text", {"pattern": "SECRET"})
    assert SECRET not in result
    assert "No lines match" in result
    assert "1 hard-linked" in result and "2 symbolic link" in result


def test_recursive_listing_never_descends_through_symlinks(world: World) -> None:
    _all_traps(world)
    listing = world.registry.run("list_folder", {"path": "project", "recursive": True})
    assert "secret2.txt" not in listing and SECRET not in listing
    assert "project/linkdir -> " in listing and "(symbolic link)" in listing
    assert "project/\\u202etxt.exe" in listing and "hidden or control characters" in listing
    assert "project/\\xff.txt" in listing
    assert "project/hard.txt  (16 B, hard link, not readable)" in listing


def test_fifo_inside_folder_does_not_block_search(world: World) -> None:
    _fifo(world)
    result = world.registry.run("search_text", {"pattern": "alpha"})
    assert "project/a.txt:1: alpha" in result


DROP_ATTACKS = [
    ("proc-file", lambda w: Path("/proc/self/environ"), REASON_NOT_FILE_OR_FOLDER),
    ("proc-folder", lambda w: Path("/proc"), REASON_NOT_FILE_OR_FOLDER),
    ("sys-folder", lambda w: Path("/sys/kernel"), REASON_NOT_FILE_OR_FOLDER),
    ("dev-null", lambda w: Path("/dev/null"), REASON_NOT_FILE_OR_FOLDER),
    ("symlink-to-dev-zero", lambda w: (os.symlink("/dev/zero", w.root / "z"), w.root / "z")[1],
     REASON_NOT_FILE_OR_FOLDER),
    ("fifo", lambda w: (os.mkfifo(w.root / "p"), w.root / "p")[1], REASON_NOT_FILE_OR_FOLDER),
    ("socket", lambda w: (_unix_socket(w), w.project / "sock")[1], REASON_NOT_FILE_OR_FOLDER),
    ("binary", lambda w: (_write("b.bin", b"\x00\x01\x02")(w), w.project / "b.bin")[1], REASON_BINARY),
    ("not-utf8", lambda w: (_write("l.txt", b"\xe9\xe9\xe9")(w), w.project / "l.txt")[1], REASON_BINARY),
    ("huge", lambda w: (_huge_sparse_file(w), w.project / "huge.log")[1], REASON_TOO_BIG),
    ("missing", lambda w: w.root / "does-not-exist.txt", REASON_UNREADABLE),
    ("dangling-symlink", lambda w: (os.symlink(w.root / "gone", w.root / "d"), w.root / "d")[1], REASON_UNREADABLE),
    ("symlink-loop", lambda w: (os.symlink(w.root / "s2", w.root / "s1"), os.symlink(w.root / "s1", w.root / "s2"),
                                w.root / "s1")[2], REASON_UNREADABLE),
    ("nul-in-path", lambda w: "bad\x00name.txt", REASON_UNREADABLE),
]


@pytest.mark.parametrize(("case", "make_path", "reason"), DROP_ATTACKS, ids=[case[0] for case in DROP_ATTACKS])
def test_drop_is_rejected_with_reason(world: World, case: str, make_path: Callable[[World], Any], reason: str) -> None:
    path = make_path(world)
    accepted, rejected = classify_drop([path], LIMITS)
    assert accepted == []
    assert rejected == [(Path(path), reason)]


def _as_unprivileged_user(check: Callable[[], bool]) -> bool:
    """``check()`` in a forked child that gave up root for ``nobody`` (65534); its answer.

    Root reads any file whatever its mode, so a permission test run as root (CI) checks nothing;
    as an ordinary user it runs in-process.
    """
    if os.geteuid() != 0:
        return check()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: drop every privilege, answer one byte, never return into pytest
        status = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(write_end, b"1" if check() else b"0")
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as answer_pipe:
        answer = answer_pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and answer in (b"0", b"1"), (status, answer)
    return answer == b"1"


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
def test_unreadable_file_is_rejected_at_drop() -> None:
    import tempfile

    # a folder any user can enter (pytest's own temp folders are private to their owner)
    folder = Path(tempfile.mkdtemp(prefix="moebar-unreadable-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        locked, readable = folder / "locked.txt", folder / "readable.txt"
        locked.write_text("x")
        locked.chmod(0)
        readable.write_text("x")
        readable.chmod(0o644)

        def refused_for_want_of_permission() -> bool:
            if os.access(locked, os.R_OK):  # still privileged: the check would prove nothing
                return False
            locked_result = classify_drop([locked], LIMITS)
            readable_result = classify_drop([readable], LIMITS)
            return locked_result == ([], [(locked, REASON_UNREADABLE)]) and len(readable_result[0]) == 1

        assert _as_unprivileged_user(refused_for_want_of_permission)
    finally:
        for child in folder.iterdir():
            child.unlink()
        folder.rmdir()
