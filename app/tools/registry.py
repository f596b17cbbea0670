"""The tool registry: OpenAI-style schemas for the engine, and validated calls by name with JSON arguments."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from app.tools import builtin
from app.tools.errors import ToolError
from app.tools.names import shown
from app.tools.sandbox import DroppedFiles

log = logging.getLogger(__name__)

MAX_ARGUMENT_CHARS = 100_000

_PATH = {"type": "string", "maxLength": 4096}


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its name, what the model is told about it, its argument schema and its function."""

    name: str
    description: str
    parameters: dict[str, Any]
    function: Callable[..., str]

    def openai_schema(self) -> dict[str, Any]:
        """The entry for this tool in an OpenAI chat request's `tools` list."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


def _object(properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


BUILTIN_TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "read_file",
        "Read a text file the user dropped (or one inside a dropped folder). Returns at most 2,000 lines or "
        "256 KB; for longer files, call again with start_line to read on.",
        _object({
            "path": {**_PATH, "description": "A dropped file's name, or a path inside a dropped folder such as "
                                             "'project/src/main.py'."},
            "start_line": {"type": "integer", "minimum": 1, "description": "First line to return (1-based)."},
            "end_line": {"type": "integer", "minimum": 1, "description": "Last line to return (inclusive)."},
        }, ["path"]),
        builtin.read_file),
    ToolSpec(
        "list_folder",
        "List the files and subfolders of a dropped folder. With an empty path, list what the user dropped.",
        _object({
            "path": {**_PATH, "description": "A dropped folder's name or a folder inside it; empty for the drops."},
            "recursive": {"type": "boolean", "description": "Also list everything in subfolders."},
            "max_entries": {"type": "integer", "minimum": 1, "maximum": 2000,
                            "description": "Most entries to return (default 200)."},
        }, []),
        builtin.list_folder),
    ToolSpec(
        "search_text",
        "Find lines containing a text or regular expression in the dropped files and folders. Returns "
        "'path:line: text' for each match.",
        _object({
            "pattern": {"type": "string", "minLength": 1, "maxLength": builtin.MAX_PATTERN_CHARS,
                        "description": "The text (or regular expression in RE2 syntax, if regex is true) to find."},
            "path": {**_PATH, "description": "Search only this dropped file or folder (default: all drops)."},
            "regex": {"type": "boolean", "description": "Treat pattern as a regular expression."},
            "case_sensitive": {"type": "boolean", "description": "Match letter case exactly (default false)."},
            "max_results": {"type": "integer", "minimum": 1, "maximum": 500,
                            "description": "Most matching lines to return (default 50)."},
        }, ["pattern"]),
        builtin.search_text),
    ToolSpec(
        "file_info",
        "Size, modification time, type and line count of a dropped file or folder.",
        _object({"path": {**_PATH, "description": "A dropped item's name or a path inside a dropped folder."}},
                ["path"]),
        builtin.file_info),
)

_JSON_TYPE_NAMES = {"string": "text", "integer": "a whole number", "boolean": "true or false",
                    "number": "a number", "object": "an object"}


def _type_matches(value: Any, expected: str) -> bool:
    if expected == "string":
        return isinstance(value, str)
    if expected == "boolean":
        return isinstance(value, bool)
    if expected == "integer":
        return (isinstance(value, int) and not isinstance(value, bool)) or (
            isinstance(value, float) and math.isfinite(value) and value.is_integer())
    if expected == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    raise AssertionError(f"schema type {expected} is not supported")


def validate_arguments(spec: ToolSpec, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """Check `arguments` against the tool's schema; return them converted (3.0 → 3, optional null dropped)."""
    schema = spec.parameters
    properties: dict[str, Any] = schema["properties"]
    unknown = [key for key in arguments if key not in properties]
    if unknown:
        allowed = ", ".join(properties) or "none"
        raise ToolError(f"{spec.name} does not take the argument '{shown(str(unknown[0]))[:100]}'. "
                        f"Arguments it takes: {allowed}.")
    missing = [key for key in schema["required"] if key not in arguments]
    if missing:
        raise ToolError(f"{spec.name} needs the argument '{missing[0]}'.")
    checked: dict[str, Any] = {}
    for key, value in arguments.items():
        if value is None and key not in schema["required"]:
            continue  # models often send null for an optional argument they mean to leave out
        rules = properties[key]
        if not _type_matches(value, rules["type"]):
            raise ToolError(f"The argument '{key}' of {spec.name} must be {_JSON_TYPE_NAMES[rules['type']]}, "
                            f"not {json.dumps(value)[:80]}.")
        if rules["type"] == "integer":
            value = int(value)
        if "minimum" in rules and value < rules["minimum"]:
            raise ToolError(f"The argument '{key}' of {spec.name} must be at least {rules['minimum']}, not {value}.")
        if "maximum" in rules and value > rules["maximum"]:
            raise ToolError(f"The argument '{key}' of {spec.name} must be at most {rules['maximum']}, not {value}.")
        if "minLength" in rules and len(value) < rules["minLength"]:
            raise ToolError(f"The argument '{key}' of {spec.name} must not be empty.")
        if "maxLength" in rules and len(value) > rules["maxLength"]:
            raise ToolError(f"The argument '{key}' of {spec.name} is {len(value)} characters long; the limit is "
                            f"{rules['maxLength']}.")
        checked[key] = value
    return checked


def parse_arguments(arguments: str | Mapping[str, Any] | None) -> Mapping[str, Any]:
    """Decode a tool call's arguments (a JSON object as text, a dict, or empty) or raise ToolError."""
    if arguments is None:
        return {}
    if isinstance(arguments, Mapping):
        return arguments
    if not isinstance(arguments, str):
        raise ToolError(f"Tool arguments must be a JSON object, not {type(arguments).__name__}.")
    if not arguments.strip():
        return {}
    if len(arguments) > MAX_ARGUMENT_CHARS:
        raise ToolError(f"The tool arguments are {len(arguments):,} characters long; the limit is "
                        f"{MAX_ARGUMENT_CHARS:,}.")
    try:
        decoded = json.loads(arguments)
    except ValueError as error:
        raise ToolError(f"The tool arguments are not valid JSON ({error}). Send a JSON object such as "
                        '{"path": "notes.txt"}.') from None
    except RecursionError:
        raise ToolError("The tool arguments are nested too deeply to read.") from None
    if not isinstance(decoded, dict):
        raise ToolError(f"The tool arguments must be a JSON object, not {type(decoded).__name__}.")
    return decoded


class ToolRegistry:
    """The tools offered to the model, bound to the user's dropped files."""

    def __init__(self, dropped: DroppedFiles, tools: tuple[ToolSpec, ...] = BUILTIN_TOOLS) -> None:
        self.dropped = dropped
        self._tools = {tool.name: tool for tool in tools}

    def names(self) -> list[str]:
        """Tool names, in the order they are offered."""
        return list(self._tools)

    def schemas(self) -> list[dict[str, Any]]:
        """The `tools` list for an OpenAI-style chat request."""
        return [tool.openai_schema() for tool in self._tools.values()]

    def spec(self, name: str) -> ToolSpec:
        """The tool called `name`, or ToolError naming the tools there are."""
        tool = self._tools.get(name) if isinstance(name, str) else None
        if tool is None:
            raise ToolError(f"There is no tool called '{shown(str(name))[:100]}'. "
                            f"Available tools: {', '.join(self._tools)}.")
        return tool

    def run(self, name: str, arguments: str | Mapping[str, Any] | None = None) -> str:
        """Run tool `name` with JSON (or dict) arguments; returns its text or raises ToolError."""
        tool = self.spec(name)
        checked = validate_arguments(tool, parse_arguments(arguments))
        try:
            return tool.function(self.dropped, **checked)
        except ToolError:
            raise
        except OSError as error:
            # Files can change under a running tool (deleted mid-read, disk errors); say so plainly.
            raise ToolError(f"{name} failed while reading: {error.strerror or error}.") from None
        except Exception as error:  # MemoryError, a bug: the model gets a tool error, the app goes on
            log.error("tool %s failed", name, exc_info=True)
            raise ToolError(f"{name} failed: {type(error).__name__}: {shown(str(error))[:300]}") from None
