"""A tool result from an MCP server as the text the model reads: text kept, other content described, long results cut."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from typing import Any

from mcp import types

from app.tools.limits import human_size

MAX_RESULT_CHARS = 20_000


def _decoded_size(data: str) -> int | None:
    try:
        return len(base64.b64decode(data, validate=True))
    except (binascii.Error, ValueError):
        return None


def _size_text(data: str) -> str:
    size = _decoded_size(data)
    return human_size(size) if size is not None else f"{len(data):,} characters of base64"


def describe_block(block: Any) -> str:
    """One content block as text; images, audio and binary resources are described, never dumped."""
    if isinstance(block, types.TextContent):
        return block.text
    if isinstance(block, types.ImageContent):
        return f"[image ({block.mime_type}, {_size_text(block.data)}): not shown, this model reads text only]"
    if isinstance(block, types.AudioContent):
        return f"[audio ({block.mime_type}, {_size_text(block.data)}): not shown, this model reads text only]"
    if isinstance(block, types.ResourceLink):
        detail = f", {block.mime_type}" if block.mime_type else ""
        return f"[resource link: {block.uri} ({block.name}{detail})]"
    if isinstance(block, types.EmbeddedResource):
        resource = block.resource
        if isinstance(resource, types.TextResourceContents):
            return f"[resource {resource.uri}]\n{resource.text}"
        mime = getattr(resource, "mime_type", None) or "binary"
        blob = getattr(resource, "blob", "")
        return f"[resource {resource.uri} ({mime}, {_size_text(blob)}): binary, not shown]"
    kind = getattr(block, "type", type(block).__name__)
    return f"[{kind} content: not shown]"


def cut(text: str, limit: int = MAX_RESULT_CHARS) -> str:
    """`text`, or its first `limit` characters with a note saying how much was left out."""
    if len(text) <= limit:
        return text
    return (text[:limit] + f"\n[Result cut: the tool returned {len(text):,} characters; only the first "
            f"{limit:,} are shown so that it does not flood the conversation.]")


def result_text(content: Sequence[Any], structured: dict[str, Any] | None = None,
                limit: int = MAX_RESULT_CHARS) -> str:
    """The text the model gets for a tool result (its content blocks, or its structured content if none)."""
    parts = [describe_block(block) for block in content]
    if not parts and structured is not None:
        parts.append(json.dumps(structured, ensure_ascii=False, indent=1))
    text = "\n".join(parts) if parts else "(the tool returned nothing)"
    return cut(text, limit)
