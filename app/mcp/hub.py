"""McpHub: every MCP server connection, in one worker thread with its own asyncio loop.

The thread runs an anyio blocking portal (the app's bridge pattern: the GUI thread hands work
to it and gets concurrent futures back). Each server lives in one long-lived task that opens
the transport and the session, lists the tools, then waits until it is told to stop and closes
what it opened (anyio: only the task that entered a context may exit it). A server that cannot
be started, crashes, hangs or writes garbage fails alone: its task ends with a reason and the
other servers and the UI carry on. Tool calls run as their own tasks on the server's session,
each with the server's timeout, and are stopped by cancelling their future.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import anyio.abc
from anyio.from_thread import BlockingPortal, start_blocking_portal
from mcp import ClientSession, StdioServerParameters, stdio_client, types
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client

from app.mcp.config import ServerConfig

log = logging.getLogger(__name__)

Status = Literal["starting", "ready", "failed", "stopped", "disabled"]
PING_INTERVAL_S = 10.0  # how often a ready server is checked (a crash shows in Settings within this)
STOP_WAIT_S = 8.0
STDERR_TAIL_CHARS = 300


@dataclass(frozen=True)
class McpToolInfo:
    """One tool a server offers."""

    server: str
    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class ServerState:
    """What Settings shows for a server: its status, its tools when ready, the reason when failed."""

    name: str
    status: Status
    tools: tuple[McpToolInfo, ...] = ()
    reason: str = ""
    log_path: Path | None = None

    def summary(self) -> str:
        """One line for the user: 'ready with 3 tools', 'failed: ...'."""
        if self.status == "ready":
            return f"ready with {len(self.tools)} tool{'s' if len(self.tools) != 1 else ''}"
        if self.status == "failed":
            return f"failed: {self.reason}"
        return self.status


class McpServerError(RuntimeError):
    """A server could not be started or a call to it failed; the message names the server."""


def log_file_name(server: str) -> str:
    """A file name for a server's stderr log (the name with anything unusual replaced)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", server).strip("._") or "server"


def _stderr_tail(path: Path, start: int) -> str:
    """The last line the server wrote to stderr since byte `start` of its log."""
    try:
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read()[-4096:]
    except OSError:
        return ""
    lines = [line.strip() for line in data.decode("utf-8", "replace").splitlines()
             if line.strip() and not (line.startswith("--- ") and " moebar: " in line)]  # not the hub's own notes
    return lines[-1][:STDERR_TAIL_CHARS] if lines else ""


@dataclass
class _Runner:
    """The live side of one server: its session when ready, its stop signal, its calls."""

    config: ServerConfig
    stop: anyio.Event
    future: concurrent.futures.Future[None] | None = None
    session: ClientSession | None = None
    garbage: list[str] = field(default_factory=list)
    failure: anyio.Event | None = None  # set when the server writes garbage (made on the loop thread)


class McpHub:
    """Starts, stops and calls MCP servers; thread-safe; states are reported through `on_state`."""

    def __init__(self, log_dir: Path, path_for_servers: Callable[[], str] | None = None,
                 on_state: Callable[[ServerState], None] | None = None,
                 ping_interval_s: float = PING_INTERVAL_S) -> None:
        self.log_dir = log_dir
        self.ping_interval_s = ping_interval_s
        self._path_for_servers = path_for_servers or (lambda: os.environ.get("PATH", os.defpath))
        self._server_path: str | None = None
        self._on_state = on_state
        self._lock = threading.Lock()
        self._control = threading.RLock()  # one start/stop at a time, so a name never gets two live runners
        self._states: dict[str, ServerState] = {}
        self._runners: dict[str, _Runner] = {}
        self._portal_cm: Any = None
        self._portal: BlockingPortal | None = None

    # ------------------------------------------------------------ lifetime (any thread)

    def _ensure_portal(self) -> BlockingPortal:
        with self._lock:
            if self._portal is None:
                self._portal_cm = start_blocking_portal(name="moebar-mcp")
                self._portal = self._portal_cm.__enter__()
            return self._portal

    def shutdown(self) -> None:
        """Stop every server and the worker thread (waits a few seconds at most)."""
        for name in list(self._runners):
            self.stop_server(name, wait=False)
        deadline = time.monotonic() + STOP_WAIT_S
        for runner in list(self._runners.values()):
            if runner.future is not None:
                with contextlib.suppress(Exception):
                    runner.future.result(timeout=max(0.1, deadline - time.monotonic()))
        with self._lock:
            cm, self._portal_cm, self._portal = self._portal_cm, None, None
        if cm is not None:
            with contextlib.suppress(Exception):
                cm.__exit__(None, None, None)

    # ------------------------------------------------------------ servers (any thread)

    def states(self) -> dict[str, ServerState]:
        """The state of every server the hub knows, by name."""
        with self._lock:
            return dict(self._states)

    def state(self, name: str) -> ServerState | None:
        """The state of server `name`."""
        with self._lock:
            return self._states.get(name)

    def start_server(self, config: ServerConfig) -> None:
        """Start `config`'s server (stopping a running one of that name first); disabled ones are only listed."""
        with self._control:
            self._start_server(config)

    def _start_server(self, config: ServerConfig) -> None:
        self.stop_server(config.name)
        if config.disabled:
            self._set(ServerState(config.name, "disabled"))
            return
        portal = self._ensure_portal()
        runner = portal.call(lambda: _Runner(config, anyio.Event(), failure=anyio.Event()))
        with self._lock:
            self._runners[config.name] = runner
        self._set(ServerState(config.name, "starting", log_path=self.log_path(config.name)))
        runner.future = portal.start_task_soon(self._serve, runner)

    def stop_server(self, name: str, wait: bool = True) -> None:
        """Ask server `name` to stop; with `wait`, block until it has (a few seconds at most)."""
        with self._control, self._lock:
            runner = self._runners.pop(name, None)
        if runner is None or self._portal is None:
            return
        with contextlib.suppress(Exception):
            self._portal.call(runner.stop.set)
        if wait and runner.future is not None:
            try:
                runner.future.result(timeout=STOP_WAIT_S)
            except concurrent.futures.TimeoutError:
                runner.future.cancel()
            except Exception:  # noqa: BLE001 - the server already reported its failure
                pass

    def forget_server(self, name: str) -> None:
        """Stop server `name` and drop its state (it was removed from the configuration)."""
        with self._control:
            self.stop_server(name)
            with self._lock:
                self._states.pop(name, None)

    def log_path(self, name: str) -> Path:
        """Where server `name`'s stderr (and the hub's notes about it) go."""
        return self.log_dir / f"{log_file_name(name)}.log"

    # ------------------------------------------------------------ calls (any thread)

    def call_tool(self, server: str, tool: str, arguments: dict[str, Any]) -> concurrent.futures.Future[Any]:
        """Call a tool; the future gives the CallToolResult, raises McpServerError, or is cancelled to stop the call."""
        with self._lock:
            runner = self._runners.get(server)
        if runner is None or runner.session is None:
            state = self.state(server)
            why = f" ({state.summary()})" if state is not None else ""
            raise McpServerError(f"The MCP server '{server}' is not running{why}.")
        return self._ensure_portal().start_task_soon(self._call, runner, tool, arguments)

    # ------------------------------------------------------------ the loop thread

    def _set(self, state: ServerState) -> None:
        with self._lock:
            self._states[state.name] = state
        if self._on_state is not None:
            try:
                self._on_state(state)
            except Exception:  # a broken listener must not take the server down
                log.exception("MCP state listener failed")

    def _note(self, name: str, text: str) -> None:
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            with open(self.log_path(name), "a", encoding="utf-8") as handle:
                handle.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} moebar: {text}\n")
        except OSError:
            log.warning("could not write the MCP log of %s", name)

    def _environment(self, config: ServerConfig) -> dict[str, str]:
        if self._server_path is None:
            self._server_path = self._path_for_servers()
        return {"PATH": self._server_path, **config.env}

    @contextlib.asynccontextmanager
    async def _transport(self, config: ServerConfig, errlog: Any) -> AsyncIterator[Any]:
        if config.is_remote:
            async with create_mcp_http_client(headers=config.headers or None) as client:
                async with streamable_http_client(config.url, http_client=client) as streams:
                    yield streams
            return
        env = self._environment(config)
        command = os.path.expanduser(config.command)
        resolved = shutil.which(command, path=env["PATH"]) if os.sep not in command else command
        if resolved is None or not os.path.exists(resolved):
            where = "" if os.sep in command else f" on the PATH ({env['PATH']})"
            raise McpServerError(f"the command '{config.command}' was not found{where}")
        params = StdioServerParameters(command=resolved, args=list(config.args), env=env,
                                       cwd=os.path.expanduser(config.cwd) if config.cwd else None)
        async with stdio_client(params, errlog=errlog) as streams:
            yield streams

    async def _serve(self, runner: _Runner) -> None:
        config = runner.config
        log_path = self.log_path(config.name)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._note(config.name, f"starting {config.describe()}")
        start = log_path.stat().st_size if log_path.exists() else 0
        failed: str | None = None
        try:
            with open(log_path, "a", encoding="utf-8") as errlog:
                await self._run_session(runner, errlog)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # noqa: BLE001 - every failure of one server is reported, nothing else
            failed = self._reason(config, exc, runner, log_path, start)
        finally:
            runner.session = None
        with self._lock:
            current = self._runners.get(config.name) is runner
            if current:
                del self._runners[config.name]
            replaced = not current and config.name in self._runners
        if failed is not None and not runner.stop.is_set():
            self._note(config.name, f"failed: {failed}")
            if not replaced:
                self._set(ServerState(config.name, "failed", reason=failed, log_path=log_path))
            return
        self._note(config.name, "stopped")
        if not replaced:
            self._set(ServerState(config.name, "stopped", log_path=log_path))

    async def _run_session(self, runner: _Runner, errlog: Any) -> None:
        config = runner.config

        async def on_message(message: Any) -> None:
            if isinstance(message, Exception):
                runner.garbage.append(_garbage_text(message))
                if runner.failure is not None:
                    runner.failure.set()
            await anyio.lowlevel.checkpoint()

        async with self._transport(config, errlog) as (read, write):
            async with ClientSession(read, write, message_handler=on_message) as session:
                tools = await self._handshake(runner, session)
                runner.session = session
                self._set(ServerState(config.name, "ready", tools=tools, log_path=self.log_path(config.name)))
                self._note(config.name, f"ready with {len(tools)} tools")
                await self._watch(runner, session)

    async def _handshake(self, runner: _Runner, session: ClientSession) -> tuple[McpToolInfo, ...]:
        config = runner.config
        result: list[McpToolInfo] = []
        async with anyio.create_task_group() as group:
            async def garbage_guard() -> None:
                assert runner.failure is not None
                await runner.failure.wait()
                group.cancel_scope.cancel()

            group.start_soon(garbage_guard)
            with anyio.fail_after(config.timeout_s):
                await session.initialize()
                cursor: str | None = None
                while True:
                    params = types.PaginatedRequestParams(cursor=cursor) if cursor else None
                    listing = await session.list_tools(params=params)
                    result += [McpToolInfo(config.name, t.name, t.description or "", dict(t.input_schema))
                               for t in listing.tools]
                    cursor = listing.next_cursor
                    if not cursor:
                        break
            group.cancel_scope.cancel()
        if runner.garbage:
            raise McpServerError(f"it wrote something that is not MCP JSON-RPC on stdout: {runner.garbage[0]}")
        return tuple(result)

    async def _watch(self, runner: _Runner, session: ClientSession) -> None:
        """Wait for the stop signal; a server that dies or stops answering pings ends the session with an error."""
        config = runner.config
        while not runner.stop.is_set():
            with anyio.move_on_after(self.ping_interval_s):
                await runner.stop.wait()
            if runner.stop.is_set():
                return
            with anyio.fail_after(min(config.timeout_s, 30.0)):
                await session.send_ping()

    async def _call(self, runner: _Runner, tool: str, arguments: dict[str, Any]) -> Any:
        config = runner.config
        session = runner.session
        if session is None:
            raise McpServerError(f"The MCP server '{config.name}' stopped before the call.")
        try:
            with anyio.fail_after(config.timeout_s):
                return await session.call_tool(tool, arguments)
        except TimeoutError:
            raise McpServerError(f"The MCP server '{config.name}' did not answer the call of {tool} within "
                                 f"{config.timeout_s:g} s (its timeout in mcp.json).") from None
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            raise McpServerError(f"The MCP server '{config.name}' failed the call of {tool}: "
                                 f"{_exception_text(exc)}") from None

    def _reason(self, config: ServerConfig, exc: BaseException, runner: _Runner, log_path: Path, start: int) -> str:
        leaves = list(_leaf_exceptions(exc))
        main = next((e for e in leaves if isinstance(e, McpServerError)), None)
        if main is not None:
            text = str(main)
        elif runner.garbage:
            text = f"it wrote something that is not MCP JSON-RPC on stdout: {runner.garbage[0]}"
        elif any(isinstance(e, TimeoutError) for e in leaves):
            text = (f"it did not answer within {config.timeout_s:g} s (the server's timeout in mcp.json)"
                    if runner.session is None else f"it stopped answering pings within {config.timeout_s:g} s")
        else:
            text = "; ".join(dict.fromkeys(_exception_text(e) for e in leaves)) or _exception_text(exc)
        tail = _stderr_tail(log_path, start) if not config.is_remote else ""
        if tail and tail not in text:
            text += f" (last line on stderr: {tail})"
        return text


def _garbage_text(exc: Exception) -> str:
    """What the server wrote instead of a JSON-RPC message, quoted (from pydantic's error), or the error."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            bad = errors()[0].get("input")
        except Exception:  # noqa: BLE001 - not pydantic's shape after all
            bad = None
        if isinstance(bad, str):
            return repr(bad[:200])
    lines = str(exc).splitlines()
    return lines[0][:200] if lines else type(exc).__name__


def _leaf_exceptions(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaf_exceptions(inner)]
    return [exc]


def _exception_text(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, (ConnectionError, EOFError)) or "closed" in text.lower():
        return f"the connection ended ({text or type(exc).__name__}); the server may have exited"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror}" + (f": {exc.filename}" if exc.filename else "")
    return text or type(exc).__name__

