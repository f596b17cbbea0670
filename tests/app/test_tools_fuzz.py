"""Fuzzing tool calls with hypothesis: whatever the model sends, the result is text or a ToolError."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.tools import DroppedFiles, ToolError, ToolLimits, ToolRegistry

LIMITS = ToolLimits(max_file_bytes=64 * 1024, search_timeout_s=0.2, max_search_files=50)
SECRET = "FUZZ SECRET 777"
FUZZ_SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> ToolRegistry:
    root = tmp_path_factory.mktemp("fuzz").resolve()
    (root / "outside.txt").write_text(f"{SECRET}\n")
    project = root / "project"
    (project / "sub").mkdir(parents=True)
    (project / "a.txt").write_text("alpha beta\ngamma\n")
    (project / "sub" / "b.md").write_text("# title\ntext with é and 漢字\n")
    (project / "bin.dat").write_bytes(b"\x00\x01\x02")
    os.symlink("../outside.txt", project / "out")
    os.symlink("a.txt", project / "in")
    (root / "notes.txt").write_text("notes\n")
    dropped = DroppedFiles(LIMITS)
    dropped.drop([project, root / "notes.txt"])
    return ToolRegistry(dropped)


TOOL_NAMES = st.sampled_from(["read_file", "list_folder", "search_text", "file_info"])
PATH_PIECES = st.sampled_from(["project", "notes.txt", "a.txt", "sub", "b.md", "..", ".", "", "out", "in",
                               "bin.dat", "/", "~", "\x00", "\u202e", "é", "/etc/passwd", "/proc/self/environ"])
PATHS = st.one_of(st.lists(PATH_PIECES, max_size=5).map("/".join), st.text(max_size=60))
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                         st.text(max_size=30))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)), max_leaves=6)
KEYS = st.sampled_from(["path", "start_line", "end_line", "recursive", "max_entries", "pattern", "regex",
                        "case_sensitive", "max_results", "mode", ""])
WRONG_TYPES = st.one_of(JSON_SCALARS, st.lists(JSON_SCALARS, max_size=2))


def _mostly(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Nine times in ten a value of the right type, otherwise any JSON scalar or short list."""
    return st.tuples(st.integers(0, 9), valid, WRONG_TYPES).map(lambda roll: roll[2] if roll[0] == 0 else roll[1])


PATH_ARGUMENT = _mostly(PATHS)
LINE_ARGUMENT = _mostly(st.integers(-5, 300))
FLAG_ARGUMENT = _mostly(st.booleans())
PATTERNS = _mostly(st.one_of(st.text(max_size=20), st.sampled_from(["a", "(", "[a-", "(a|aa)+$", ".*", "\\", "é"])))
ARGUMENTS_BY_TOOL = {
    "read_file": st.fixed_dictionaries({"path": PATH_ARGUMENT},
                                       optional={"start_line": LINE_ARGUMENT, "end_line": LINE_ARGUMENT}),
    "list_folder": st.fixed_dictionaries({}, optional={"path": PATH_ARGUMENT, "recursive": FLAG_ARGUMENT,
                                                       "max_entries": _mostly(st.integers(-5, 5000))}),
    "search_text": st.fixed_dictionaries({"pattern": PATTERNS}, optional={
        "path": PATH_ARGUMENT, "regex": FLAG_ARGUMENT, "case_sensitive": FLAG_ARGUMENT,
        "max_results": _mostly(st.integers(-5, 1000))}),
    "file_info": st.fixed_dictionaries({"path": PATH_ARGUMENT}),
}
PLAUSIBLE_CALLS = st.one_of([st.tuples(st.just(name), arguments) for name, arguments in ARGUMENTS_BY_TOOL.items()])


def _call(registry: ToolRegistry, name: Any, arguments: Any) -> None:
    try:
        result = registry.run(name, arguments)
    except ToolError as error:
        message = str(error)
        assert message and SECRET not in message
        return
    assert isinstance(result, str) and SECRET not in result


@settings(FUZZ_SETTINGS, max_examples=1100)
@given(call=PLAUSIBLE_CALLS)
def test_plausible_arguments_give_text_or_tool_error(registry: ToolRegistry, call: tuple[str, dict[str, Any]]) -> None:
    name, arguments = call
    _call(registry, name, arguments)
    _call(registry, name, json.dumps(arguments))  # the same call as the engine delivers it: JSON text


@settings(FUZZ_SETTINGS, max_examples=500)
@given(name=st.one_of(TOOL_NAMES, st.text(max_size=20)), arguments=st.text(max_size=200))
def test_arbitrary_argument_text_gives_text_or_tool_error(registry: ToolRegistry, name: str, arguments: str) -> None:
    _call(registry, name, arguments)


@settings(FUZZ_SETTINGS, max_examples=400)
@given(name=TOOL_NAMES, arguments=st.one_of(JSON_VALUES, st.dictionaries(KEYS, JSON_VALUES, max_size=5)))
def test_arbitrary_json_values_give_text_or_tool_error(registry: ToolRegistry, name: str, arguments: Any) -> None:
    _call(registry, name, json.dumps(arguments))


@pytest.mark.parametrize("text", ["[" * 100_000, '{"path": ' * 50_000, "x" * 200_000, "\ud800", "NaN", "{}" * 3])
def test_pathological_argument_text_is_refused_cleanly(registry: ToolRegistry, text: str) -> None:
    with pytest.raises(ToolError):
        registry.run("read_file", text)


@pytest.mark.slow
@settings(FUZZ_SETTINGS, max_examples=20000)
@given(call=PLAUSIBLE_CALLS)
def test_plausible_arguments_long(registry: ToolRegistry, call: tuple[str, dict[str, Any]]) -> None:
    test_plausible_arguments_give_text_or_tool_error.hypothesis.inner_test(registry, call)  # type: ignore[attr-defined]
