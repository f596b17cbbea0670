"""The HTTP guard's edges, driven through ASGI: no interface list on this machine, a request with
no client address, and a bounded memory of connections."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

import engine.serving.http_guard as http_guard
from engine.serving.http_guard import RequestGuard, allowed_host_names


def test_a_wildcard_bind_without_an_interface_list_still_accepts_the_host_name(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    def no_interfaces() -> Any:
        raise PermissionError("net_if_addrs not permitted in this sandbox")

    monkeypatch.setattr(psutil, "net_if_addrs", no_interfaces)
    names = allowed_host_names("0.0.0.0", ["studio.lan"])
    host = socket.gethostname().lower()
    assert {host, "studio.lan"} <= names
    assert (host + ".local" in names) == ("." not in host)


class _App:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


def _get(guard: RequestGuard, client: tuple[str, int] | None) -> dict[bytes, bytes]:
    sent: list[dict[str, Any]] = []
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/health", "headers": [(b"host", b"127.0.0.1")]}
    if client is not None:
        scope["client"] = client

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(guard(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 200
    return dict(start["headers"])


def test_a_request_without_a_client_address_is_served_and_not_counted() -> None:
    app = _App()
    guard = RequestGuard(app, max_requests_per_connection=1)
    for _ in range(3):  # (a Unix socket or a test client has no address: no connection to close)
        assert b"connection" not in _get(guard, None)
    assert app.calls == 3 and len(guard._served) == 0


def test_the_connections_remembered_are_bounded_oldest_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_guard, "_TRACKED_CONNECTIONS", 2)
    guard = RequestGuard(_App(), max_requests_per_connection=3)
    for port in (1001, 1002, 1003):
        assert b"connection" not in _get(guard, ("127.0.0.1", port))
    assert list(guard._served) == [("127.0.0.1", 1002), ("127.0.0.1", 1003)]  # 1001 was forgotten
    assert b"connection" not in _get(guard, ("127.0.0.1", 1002))
    assert _get(guard, ("127.0.0.1", 1002))[b"connection"] == b"close"  # its third request is its last
