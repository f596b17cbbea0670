"""McpService: the app's MCP servers — the configuration, the hub, the tools for the chat — for the GUI thread.

Starting, restarting and stopping servers can wait on a process for seconds, so those run on a
short-lived thread; state changes arrive from the hub's thread and are re-emitted as a Qt
signal, so connected slots run in the GUI thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path

from app import paths
from app.mcp.config import McpConfig, McpConfigError, ServerConfig, import_servers, load_config, save_config, set_server_flags
from app.mcp.hub import McpHub, ServerState
from app.mcp.login_path import login_shell_path
from app.mcp.tools import McpTools
from app.qt import QObject, Signal

log = logging.getLogger(__name__)


class McpService(QObject):
    """Owns mcp.json and the running servers; Settings and the chat controller use it."""

    state_changed = Signal(object)  # ServerState (queued into the GUI thread)
    config_changed = Signal()

    def __init__(self, config_path: Path | None = None, log_dir: Path | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.config: McpConfig = load_config(config_path)
        for problem in self.config.problems:
            log.warning("%s", problem)
        self.hub = McpHub(log_dir if log_dir is not None else paths.log_dir() / "mcp",
                          path_for_servers=login_shell_path, on_state=self.state_changed.emit)
        self.tools = McpTools(self.hub, lambda: self.config)

    @property
    def problems(self) -> list[str]:
        """What was wrong with mcp.json when it was read (each names the line)."""
        return list(self.config.problems)

    def start_all(self) -> None:
        """Start every configured server (in the background)."""
        self._start_in_background(list(self.config.servers.values()))

    def restart(self, name: str) -> None:
        """Stop and start server `name` again (enabling it if it was disabled)."""
        server = self.config.servers.get(name)
        if server is None:
            return
        if server.disabled:
            server = self._save_flags(name, disabled=False)
        self._in_background(lambda: self.hub.start_server(server))

    def set_disabled(self, name: str, disabled: bool) -> None:
        """Disable (stop, and do not start again) or enable (start) server `name`; saved to mcp.json."""
        server = self._save_flags(name, disabled=disabled)
        self._in_background(lambda: self.hub.start_server(server))

    def set_tool_enabled(self, server: str, tool: str, enabled: bool) -> None:
        """Offer a server's tool to the model or not; saved to mcp.json."""
        current = self.config.servers[server].disabled_tools
        self._save_flags(server, disabled_tools=current - {tool} if enabled else current | {tool})

    def import_from(self, source: Path) -> tuple[list[str], list[str]]:
        """Import the servers of another app's mcp.json, save, start the new ones; (added, problems)."""
        added, problems = import_servers(self.config, source)
        if added:
            save_config(self.config)
            self.config_changed.emit()
            self._start_in_background([self.config.servers[name] for name in added])
        return added, problems

    def reload(self) -> None:
        """Read mcp.json again and restart every server (after the user edited the file)."""
        old = set(self.config.servers)
        self.config = load_config(self.config.path)
        self.config_changed.emit()
        servers = list(self.config.servers.values())
        gone = old - set(self.config.servers)

        def work() -> None:
            for name in gone:
                self.hub.forget_server(name)
            for server in servers:
                self.hub.start_server(server)

        self._in_background(work)

    def states(self) -> dict[str, ServerState]:
        """The state of each server, by name."""
        return self.hub.states()

    def shutdown(self) -> None:
        """Stop every server and the hub's thread."""
        self.hub.shutdown()

    def _save_flags(self, name: str, disabled: bool | None = None,
                    disabled_tools: frozenset[str] | None = None) -> ServerConfig:
        server = set_server_flags(self.config, name, disabled=disabled, disabled_tools=disabled_tools)
        try:
            save_config(self.config)
        except (McpConfigError, OSError) as exc:
            log.warning("could not save %s: %s", self.config.path, exc)
            raise
        self.config_changed.emit()
        return server

    def _start_in_background(self, servers: list[ServerConfig]) -> None:
        def work() -> None:
            for server in servers:
                self.hub.start_server(server)

        self._in_background(work)

    @staticmethod
    def _in_background(work: Callable[[], object]) -> None:
        threading.Thread(target=work, name="moebar-mcp-control", daemon=True).start()
