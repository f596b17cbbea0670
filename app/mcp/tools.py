"""MCP tools as the model sees them: distinct names, OpenAI schemas, and calls that can time out or be stopped."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable, Mapping
from typing import Any

from app.mcp.config import McpConfig
from app.mcp.hub import McpHub, McpServerError, McpToolInfo
from app.mcp.names import PREFIX, public_name
from app.mcp.results import MAX_RESULT_CHARS, result_text
from app.tools.errors import ToolError
from app.tools.registry import parse_arguments

POLL_S = 0.1
STOPPED_RESULT = "The call was stopped before the MCP server answered."


class McpTools:
    """The enabled tools of the ready servers, offered beside the built-in tools, and runs their calls."""

    def __init__(self, hub: McpHub, config: Callable[[], McpConfig], max_result_chars: int = MAX_RESULT_CHARS) -> None:
        self.hub = hub
        self._config = config
        self.max_result_chars = max_result_chars

    def offered(self) -> dict[str, McpToolInfo]:
        """The tools offered to the model now, by public name: ready servers, tools not switched off."""
        config = self._config()
        tools: dict[str, McpToolInfo] = {}
        for name, state in sorted(self.hub.states().items()):
            server = config.servers.get(name)
            if state.status != "ready" or server is None or server.disabled:
                continue
            for tool in state.tools:
                if tool.name not in server.disabled_tools:
                    tools[public_name(name, tool.name)] = tool
        return tools

    def schemas(self) -> list[dict[str, Any]]:
        """The entries for an OpenAI chat request's `tools` list."""
        result = []
        for name, tool in self.offered().items():
            parameters = tool.input_schema if tool.input_schema.get("type") == "object" else {
                "type": "object", "properties": {}}
            description = (tool.description.strip() or tool.name) + f" (tool '{tool.name}' of the MCP server " \
                                                                   f"'{tool.server}')"
            result.append({"type": "function",
                           "function": {"name": name, "description": description, "parameters": parameters}})
        return result

    @staticmethod
    def owns(name: str) -> bool:
        """Whether `name` is an MCP tool's public name (built-in tools never start with the prefix)."""
        return isinstance(name, str) and name.startswith(PREFIX)

    def resolve(self, name: str) -> McpToolInfo:
        """The server and tool behind a public name, or ToolError if it is not offered now."""
        tool = self.offered().get(name)
        if tool is None:
            raise ToolError(f"The MCP tool '{name[:100]}' is not available now (its server is not running, or the "
                            "tool was switched off in Settings).")
        return tool

    def run(self, name: str, arguments: str | Mapping[str, Any] | None,
            cancelled: Callable[[], bool] = lambda: False) -> str:
        """Call the tool and return its result as text; ToolError for failures; stops when `cancelled()`."""
        tool = self.resolve(name)
        checked = dict(parse_arguments(arguments))
        try:
            future = self.hub.call_tool(tool.server, tool.name, checked)
        except McpServerError as exc:
            raise ToolError(str(exc)) from None
        while True:
            try:
                result = future.result(timeout=POLL_S)
                break
            except concurrent.futures.TimeoutError:
                if cancelled():
                    future.cancel()
                    raise ToolError(STOPPED_RESULT) from None
            except concurrent.futures.CancelledError:
                raise ToolError(STOPPED_RESULT) from None
            except McpServerError as exc:
                raise ToolError(str(exc)) from None
        text = result_text(result.content, result.structured_content, self.max_result_chars)
        if result.is_error:
            raise ToolError(f"The MCP server '{tool.server}' reported an error from {tool.name}: {text}")
        return text
