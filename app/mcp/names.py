"""The names MCP tools get for the model (mcp__SERVER__TOOL), and reading them back for display. No SDK import."""

from __future__ import annotations

import hashlib
import re

PREFIX = "mcp__"
MAX_NAME_CHARS = 64  # OpenAI-style function names: [A-Za-z0-9_-]{1,64}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "x"


def public_name(server: str, tool: str) -> str:
    """The name the model calls: mcp__SERVER__TOOL (never a built-in's name; shortened with a hash past 64 characters)."""
    name = f"{PREFIX}{_slug(server)}__{_slug(tool)}"
    if len(name) <= MAX_NAME_CHARS and name == f"{PREFIX}{server}__{tool}":
        return name
    # Changed or shortened names get a hash of the real pair so that two pairs never collide.
    digest = hashlib.sha1(f"{server}\0{tool}".encode()).hexdigest()[:8]
    return f"{name[: MAX_NAME_CHARS - 9]}_{digest}"


def split_public_name(name: str) -> tuple[str, str] | None:
    """(server, tool) as written in a public name, for display; None for a name that is not an MCP tool's."""
    if not name.startswith(PREFIX) or "__" not in name[len(PREFIX):]:
        return None
    server, tool = name[len(PREFIX):].split("__", 1)
    return (server, tool) if server and tool else None
