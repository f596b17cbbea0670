"""A real MCP server (the SDK's MCPServer) for the tests: small tools of every result kind.

    python tool_server.py              # over stdio
    python tool_server.py http PORT    # over streamable HTTP on 127.0.0.1:PORT (path /mcp)
"""

from __future__ import annotations

import base64
import os
import sys

import anyio
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ImageContent

server = MCPServer("test-tools")


@server.tool()
def add(a: int, b: int) -> str:
    """Add two whole numbers."""
    return str(a + b)


@server.tool()
def echo_env(name: str) -> str:
    """The value of an environment variable of the server process."""
    return os.environ.get(name, "(unset)")


@server.tool()
def long_text(characters: int) -> str:
    """A text of the given length."""
    return ("0123456789" * (characters // 10 + 1))[:characters]


@server.tool()
def picture() -> ImageContent:
    """A tiny PNG image."""
    return ImageContent(type="image", data=base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 100).decode(),
                        mime_type="image/png")


@server.tool()
async def sleep(seconds: float) -> str:
    """Sleep, then say so."""
    await anyio.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def http_header(name: str, ctx: Context) -> str:
    """The value of a header of the HTTP request that carried this call ('(none)' over stdio)."""
    request = getattr(ctx.request_context, "request", None)
    return request.headers.get(name, "(unset)") if request is not None else "(none)"


@server.tool()
def pid() -> str:
    """The server's process id."""
    return str(os.getpid())


@server.tool()
def fail(message: str) -> str:
    """Fail with the message (a ToolError: the SDK passes its text to the client)."""
    raise ToolError(message)


if __name__ == "__main__":
    print("tool_server: up", file=sys.stderr, flush=True)
    if sys.argv[1:2] == ["http"]:
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run()
