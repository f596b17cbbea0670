"""mcp.json: the MCP servers the app starts, in the `mcpServers` format of Claude Desktop, Cursor and LM Studio.

    {"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "@modelcontextprotocol/server-filesystem", "~/notes"],
                  "env": {"DEBUG": "1"}, "timeout": 60},
        "search": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer ..."}}}}

Keys MoeBar adds to a server: `timeout` (seconds for starting and for each tool call),
`disabled` (true: not started) and `disabledTools` (tool names not offered to the model).
Everything else in the file, known to MoeBar or not, is kept as it was when the app saves.
A malformed file or server entry is reported with its line and the problem; the other
servers still start.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app import paths

CONFIG_FILE_NAME = "mcp.json"
DEFAULT_TIMEOUT_S = 60.0
MAX_TIMEOUT_S = 3600.0
MAX_CONFIG_BYTES = 4 << 20


class McpConfigError(ValueError):
    """An mcp.json that cannot be read or saved; the message names the file, the line and the problem."""


@dataclass(frozen=True)
class ServerConfig:
    """One configured server: how to start (stdio) or reach (url) it, and what the user switched off."""

    name: str
    command: str = ""
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    url: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    timeout_s: float = DEFAULT_TIMEOUT_S
    disabled: bool = False
    disabled_tools: frozenset[str] = frozenset()

    @property
    def is_remote(self) -> bool:
        """Whether the server is reached over HTTP rather than started as a process."""
        return bool(self.url)

    def describe(self) -> str:
        """The command line or URL, for the user."""
        return self.url if self.url else " ".join([self.command, *self.args])


@dataclass
class McpConfig:
    """A parsed mcp.json: the servers that could be read, the problems of those that could not, and the raw document."""

    path: Path
    servers: dict[str, ServerConfig] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    document: dict[str, Any] = field(default_factory=lambda: {"mcpServers": {}})
    readable: bool = True  # False when the file is not JSON: saving would lose what the user wrote


def default_config_path() -> Path:
    """mcp.json in the app's config folder (next to settings.json)."""
    return paths.config_dir() / CONFIG_FILE_NAME


def _line_of_key(text: str, key: str) -> int:
    """The 1-based line where `"key":` first appears in `text` (1 when it cannot be found)."""
    match = re.search(re.escape(json.dumps(key)) + r"\s*:", text)
    return text.count("\n", 0, match.start()) + 1 if match else 1


def _string_map(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, dict):
        raise McpConfigError(f"'{where}' must be an object of names to text, not {_kind(value)}")
    for key, item in value.items():
        if not isinstance(item, str):
            raise McpConfigError(f"'{where}.{key}' must be text, not {_kind(item)}")
    return dict(value)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "true/false", int: "a number", float: "a number", str: "text", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


def parse_server(name: str, entry: Any) -> ServerConfig:
    """Check one `mcpServers` entry; McpConfigError names the field and the problem."""
    if not name.strip():
        raise McpConfigError("a server needs a non-empty name")
    if not isinstance(entry, dict):
        raise McpConfigError(f"the entry must be an object, not {_kind(entry)}")
    command, url = entry.get("command"), entry.get("url", entry.get("serverUrl"))
    if command is not None and url is not None:
        raise McpConfigError("give either 'command' (a local server) or 'url' (a remote one), not both")
    if command is None and url is None:
        raise McpConfigError("needs 'command' (a program to start) or 'url' (a remote server)")
    values: dict[str, Any] = {"name": name}
    if command is not None:
        if not isinstance(command, str) or not command.strip():
            raise McpConfigError(f"'command' must be non-empty text, not {json.dumps(command)[:60]}")
        args = entry.get("args", [])
        if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
            raise McpConfigError(f"'args' must be a list of text, not {json.dumps(args)[:60]}")
        values.update(command=command, args=tuple(args), env=_string_map(entry.get("env", {}), "env"))
        cwd = entry.get("cwd", "")
        if not isinstance(cwd, str):
            raise McpConfigError(f"'cwd' must be text, not {_kind(cwd)}")
        values["cwd"] = cwd
    else:
        if not isinstance(url, str) or not re.match(r"^https?://", url):
            raise McpConfigError(f"'url' must start with http:// or https://, not {json.dumps(url)[:60]}")
        values.update(url=url, headers=_string_map(entry.get("headers", {}), "headers"))
    timeout = entry.get("timeout", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) \
            or not 0 < timeout <= MAX_TIMEOUT_S:
        raise McpConfigError(f"'timeout' must be a number of seconds above 0 and at most {MAX_TIMEOUT_S:g}, "
                             f"not {json.dumps(timeout)}")
    values["timeout_s"] = float(timeout)
    disabled = entry.get("disabled", False)
    if not isinstance(disabled, bool):
        raise McpConfigError(f"'disabled' must be true or false, not {json.dumps(disabled)[:40]}")
    values["disabled"] = disabled
    tools = entry.get("disabledTools", [])
    if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
        raise McpConfigError(f"'disabledTools' must be a list of tool names, not {json.dumps(tools)[:60]}")
    values["disabled_tools"] = frozenset(tools)
    return ServerConfig(**values)


def parse_config_text(text: str, path: Path) -> McpConfig:
    """Parse the text of an mcp.json; problems are collected (with line numbers), never raised."""
    config = McpConfig(path=path)
    try:
        document = json.loads(text) if text.strip() else {"mcpServers": {}}
    except json.JSONDecodeError as exc:
        config.readable = False
        config.problems.append(f"{path}, line {exc.lineno} column {exc.colno}: {exc.msg}. "
                               "No MCP servers were started; fix the file and restart the servers.")
        return config
    except RecursionError:
        config.readable = False
        config.problems.append(f"{path}: nested too deeply to read. No MCP servers were started.")
        return config
    if not isinstance(document, dict):
        config.readable = False
        config.problems.append(f"{path}, line 1: the top level must be an object with \"mcpServers\", "
                               f"not {_kind(document)}. No MCP servers were started.")
        return config
    servers = document.setdefault("mcpServers", {})
    if not isinstance(servers, dict):
        config.readable = False
        config.problems.append(f"{path}, line {_line_of_key(text, 'mcpServers')}: \"mcpServers\" must be an "
                               f"object of server names to entries, not {_kind(servers)}. No MCP servers were started.")
        return config
    config.document = document
    for name, entry in servers.items():
        try:
            config.servers[name] = parse_server(name, entry)
        except McpConfigError as exc:
            config.problems.append(f"{path}, line {_line_of_key(text, name)}: server '{name}': {exc}. "
                                   "It is not started.")
    return config


def load_config(path: Path | None = None) -> McpConfig:
    """Read mcp.json (a missing file is an empty configuration); never raises for its content."""
    path = path if path is not None else default_config_path()
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        return McpConfig(path=path)
    except OSError as exc:
        return McpConfig(path=path, problems=[f"{path}: could not be read ({exc.strerror or exc})."], readable=False)
    if len(raw) > MAX_CONFIG_BYTES:
        return McpConfig(path=path, problems=[f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB; not read."],
                         readable=False)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return McpConfig(path=path, problems=[f"{path}, line {line}: not UTF-8 text ({exc.reason})."],
                         readable=False)
    return parse_config_text(text, path)


def save_config(config: McpConfig) -> None:
    """Write the document atomically; refuses a file that could not be read (it would be overwritten)."""
    if not config.readable:
        raise McpConfigError(f"{config.path} could not be read, so MoeBar will not overwrite it; fix it by hand.")
    paths.ensure_dir(config.path.parent)
    text = json.dumps(config.document, indent=2, ensure_ascii=False) + "\n"
    fd, temp_name = tempfile.mkstemp(prefix=f".{config.path.name}.", suffix=".tmp", dir=config.path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, config.path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise


def set_server_flags(config: McpConfig, name: str, *, disabled: bool | None = None,
                     disabled_tools: frozenset[str] | None = None) -> ServerConfig:
    """Change a server's `disabled` / `disabledTools` in the document (other keys untouched) and re-parse it."""
    entry = config.document["mcpServers"].get(name)
    if not isinstance(entry, dict):
        raise McpConfigError(f"There is no server '{name}' in {config.path}.")
    if disabled is not None:
        if disabled:
            entry["disabled"] = True
        else:
            entry.pop("disabled", None)
    if disabled_tools is not None:
        if disabled_tools:
            entry["disabledTools"] = sorted(disabled_tools)
        else:
            entry.pop("disabledTools", None)
    server = parse_server(name, entry)
    config.servers[name] = server
    return server


def import_servers(config: McpConfig, source: Path) -> tuple[list[str], list[str]]:
    """Copy the `mcpServers` of another app's file into `config`; returns (names added, problems).

    A name already present is kept as it is (the imported entry is reported, not merged).
    """
    other = load_config(source)
    if not other.readable:
        return [], other.problems
    if not config.readable:
        raise McpConfigError(f"{config.path} could not be read, so nothing can be imported into it.")
    added: list[str] = []
    problems = list(other.problems)
    for name, entry in other.document.get("mcpServers", {}).items():
        if name not in other.servers:
            continue  # reported in other.problems
        if name in config.document["mcpServers"]:
            problems.append(f"'{name}' from {source} was not imported: a server with that name already exists.")
            continue
        config.document["mcpServers"][name] = json.loads(json.dumps(entry))
        config.servers[name] = other.servers[name]
        added.append(name)
    return added, problems


def known_import_sources(platform: str = sys.platform, home: Path | None = None) -> dict[str, Path]:
    """Where Claude Desktop and LM Studio keep their MCP configuration on this platform (existing or not)."""
    home = home if home is not None else Path.home()
    if platform == "darwin":
        claude = home / "Library" / "Application Support" / "Claude" / "claude_desktop_config.json"
    elif platform.startswith("win"):
        claude = Path(os.environ.get("APPDATA", home / "AppData" / "Roaming")) / "Claude" / "claude_desktop_config.json"
    else:
        claude = Path(os.environ.get("XDG_CONFIG_HOME", home / ".config")) / "Claude" / "claude_desktop_config.json"
    return {"Claude Desktop": claude, "LM Studio": home / ".lmstudio" / "mcp.json"}
