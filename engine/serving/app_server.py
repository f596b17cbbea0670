"""The app's local server: the OpenAI-compatible HTTP API served from inside the engine process.

The app asks for it with a `serve` request; the engine runs uvicorn on a thread beside its stdio
loop, on the same EngineService, so the loaded model is shared, never loaded twice. Every chat
turn of the service runs on the one engine thread in arrival order (service.ENGINE_THREAD), so a
turn from the app and one from the HTTP server never interleave their tokens: the later one waits
until the earlier one is done. Changes of state (started, stopped, requests running, a port that
is taken) are reported as `server` events.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.serving.http_guard import allowed_host_names
from engine.serving.http_server import create_app, is_loopback
from engine.serving.protocol import ServeRequest, ServerEvent
from engine.serving.service import EngineService

log = logging.getLogger("moebar.app_server")

START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
CHAT_PATH = "/v1/chat/completions"


class _ModelFollowingApp:
    """The HTTP app for whatever model the service has loaded now (rebuilt when the model changes)."""

    def __init__(self, service: EngineService, api_key: str | None, on_request: Callable[[int], None],
                 allowed_hosts: tuple[str, ...] = ()) -> None:
        self.service = service
        self.api_key = api_key
        self.allowed_hosts = allowed_hosts  # Host names besides loopback ones (http_guard)
        self._on_request = on_request
        self._model_id: str | None = None
        self._app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        loaded = self.service.loaded
        model_id = loaded.name if loaded is not None else "no-model-loaded"
        if self._app is None or model_id != self._model_id:
            self._app = create_app(self.service, model_id, self.api_key, allowed_hosts=self.allowed_hosts)
            self._model_id = model_id
        counted = scope.get("type") == "http" and scope.get("path") == CHAT_PATH
        if counted:
            self._on_request(+1)
        try:
            await self._app(scope, receive, send)
        finally:
            if counted:
                self._on_request(-1)


class LocalApiServer:
    """Starts and stops the HTTP server on a thread; reports its state through `emit`."""

    def __init__(self, service: EngineService, emit: Callable[[ServerEvent], None]) -> None:
        self.service = service
        self._emit = emit
        self._lock = threading.Lock()
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self._host = ""
        self._port = 0
        self._active = 0

    @property
    def running(self) -> bool:
        """Whether the server is listening."""
        return self._server is not None

    def state(self, error: str = "") -> ServerEvent:
        """The state now, as the event the app gets."""
        running = self._server is not None
        return ServerEvent(running=running, host=self._host if running else "", port=self._port if running else 0,
                           active_requests=self._active if running else 0, error=error)

    def apply(self, request: ServeRequest) -> ServerEvent:
        """Start, restart (new address or key) or stop the server as `request` asks; returns the new state."""
        with self._lock:
            self._stop()
            if not request.enabled:
                event = self.state()
            else:
                try:
                    event = self._start(request)
                except Exception as exc:  # the app waits for this answer: never leave it without one
                    log.exception("the local API server could not start")
                    event = self.state(error=f"could not start the server on {request.host}:{request.port}: "
                                             f"{type(exc).__name__}: {exc}")
        self._emit(event)
        return event

    def close(self) -> None:
        """Stop the server (engine shutdown)."""
        with self._lock:
            self._stop()

    def _count(self, delta: int) -> None:
        """An HTTP chat request started (+1) or ended (-1): report the running server's new count.

        Not while stopped or stopping (``_stop`` clears ``_server`` first): a request that ends
        during a stop would otherwise report "not running" before the stop's own answer, and a
        client waiting for that answer would take the early event for it.
        """
        self._active = max(0, self._active + delta)
        if self._server is not None:
            self._emit(self.state())

    def _start(self, request: ServeRequest) -> ServerEvent:
        import uvicorn

        if not is_loopback(request.host):
            log.warning("serving on %s: other machines that can reach it can use the model%s", request.host,
                        "" if request.api_key else " (no API key is set)")
        sock: socket.socket | None = None
        try:
            family = socket.AF_INET6 if ":" in request.host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)  # fails where the family is off (no IPv6)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((request.host, request.port))
            sock.listen(128)
        except (OSError, UnicodeError, TypeError) as exc:  # (an unknown host name is a socket.gaierror, an OSError)
            if sock is not None:
                sock.close()
            if isinstance(exc, OSError):
                why = "the port is in use by another program" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
            else:  # a host name IDNA cannot encode: CPython raises TypeError("encoding of hostname failed")
                why = f"the host name cannot be used ({exc})"
            return self.state(error=f"could not listen on {request.host}:{request.port}: {why}")
        app = _ModelFollowingApp(self.service, request.api_key or None, self._count,
                                 tuple(allowed_host_names(request.host)))
        config = uvicorn.Config(app, log_level="warning", lifespan="off")
        server = uvicorn.Server(config)

        def serve() -> None:
            try:
                asyncio.run(server.serve(sockets=[sock]))
            except BaseException:  # noqa: BLE001 - a crashed server is reported, never takes the engine down
                log.exception("the local API server stopped with an error")
            finally:
                sock.close()

        thread = threading.Thread(target=serve, name="moebar-local-api", daemon=True)
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not server.started:
            server.should_exit = True
            thread.join(STOP_TIMEOUT_S)
            return self.state(error=f"the server on {request.host}:{request.port} did not start")
        self._server, self._thread = server, thread
        self._host, self._port = request.host, int(sock.getsockname()[1])
        self._active = 0
        log.info("local API server on http://%s:%d/v1", self._host, self._port)
        return self.state()

    def _stop(self) -> None:
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is None:
            return
        server.should_exit = True
        if thread is not None:
            thread.join(STOP_TIMEOUT_S)
            if thread.is_alive():
                server.force_exit = True
                thread.join(STOP_TIMEOUT_S)
        self._active = 0
