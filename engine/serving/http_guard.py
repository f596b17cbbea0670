"""Who may talk to `serve`: the Host a request names, the web page (Origin) it comes from, and how
many requests one connection may make.

A web page in the user's browser can reach a server on 127.0.0.1: a "simple" cross-site POST
needs no preflight, and DNS rebinding lets a page on an attacker's name read the answers. So:
- Host must name this machine: a loopback name or address, the configured bind address, or a
  name the user allowed (`--allow-host`); on a wildcard bind also this machine's own addresses
  and host name. Anything else is refused with 403 before any route runs.
- A request carrying an Origin (a browser's request from a page) is refused with 403 unless the
  user allowed that origin (`--cors-origin`, exact "scheme://host[:port]", or "*"); allowed origins
  get CORS headers and their preflight (OPTIONS) is answered.
- One connection serves at most `max_requests_per_connection` requests; the last answer says
  "Connection: close", so a client cannot keep one connection busy forever.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
WILDCARD_BINDS = frozenset({"", "0.0.0.0", "::", "[::]"})
DEFAULT_MAX_REQUESTS_PER_CONNECTION = 1000
_TRACKED_CONNECTIONS = 4096  # request counts kept for at most this many connections (oldest forgotten)
_CORS_METHODS = b"GET, POST, OPTIONS"
_CORS_HEADERS = b"authorization, content-type"


def host_of(header: str) -> str:
    """The host name of a Host header ("example.com:8000", "[::1]:80"), lower case, no final dot."""
    value = header.strip().lower()
    if value.startswith("["):
        name = value[1 : value.find("]")] if "]" in value else value[1:]
    elif value.count(":") == 1:
        name = value.partition(":")[0]
    else:
        name = value
    return name.rstrip(".")


def is_loopback_host(name: str) -> bool:
    """Whether a host name or address means this machine through the loopback interface."""
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _machine_names() -> set[str]:
    """This machine's host names and interface addresses (for a wildcard bind)."""
    names = {socket.gethostname().lower()}
    names |= {name + ".local" for name in list(names) if "." not in name}
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            names |= {a.address.split("%")[0].lower() for a in addresses if a.family in (socket.AF_INET, socket.AF_INET6)}
    except Exception:  # no interface list here: loopback and the named hosts still work
        pass
    return names


def allowed_host_names(bind_host: str, extra: Iterable[str] = ()) -> frozenset[str]:
    """Host names (besides loopback ones) a request may name for a server bound to `bind_host`."""
    names = {host_of(name) for name in extra if name.strip()}
    bind = bind_host.strip().lower()
    if bind in WILDCARD_BINDS:
        names |= _machine_names()
    else:
        names.add(host_of(bind))
    return frozenset(names)


def normalize_origin(origin: str) -> str:
    """An origin as browsers send it: lower case, no trailing slash."""
    return origin.strip().lower().rstrip("/")


class RequestGuard:
    """ASGI middleware checking Host and Origin, answering CORS preflights and bounding requests per connection."""

    def __init__(
        self,
        app: ASGIApp,
        allowed_hosts: Iterable[str] = (),
        cors_origins: Iterable[str] = (),
        max_requests_per_connection: int = DEFAULT_MAX_REQUESTS_PER_CONNECTION,
    ) -> None:
        if max_requests_per_connection < 1:
            raise ValueError(f"max_requests_per_connection must be at least 1, got {max_requests_per_connection}")
        self.app = app
        self.allowed_hosts = frozenset(host_of(h) for h in allowed_hosts)
        self.cors_origins = frozenset(normalize_origin(o) for o in cors_origins)
        self.max_requests = max_requests_per_connection
        self._served: OrderedDict[Any, int] = OrderedDict()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        host = headers.get("host")
        if host is not None and not self._host_allowed(host_of(host)):
            await _refuse(send, 403, "forbidden_host", f"the Host header names '{host_of(host)[:200]}', which is not "
                          "this machine's loopback address or the configured host; start serve with --allow-host "
                          "NAME to accept it")
            return
        origin = headers.get("origin")
        allowed_origin = None
        if origin is not None:
            if not self._origin_allowed(normalize_origin(origin)):
                await _refuse(send, 403, "forbidden_origin", f"requests from web pages at '{origin[:200]}' are "
                              "refused; start serve with --cors-origin ORIGIN to allow that page")
                return
            allowed_origin = origin.strip()
            if scope["method"] == "OPTIONS" and "access-control-request-method" in headers:
                await _preflight(send, allowed_origin)
                return
        close = self._count(scope.get("client"))
        await self.app(scope, receive, _with_headers(send, allowed_origin, close))

    def _host_allowed(self, name: str) -> bool:
        return is_loopback_host(name) or name in self.allowed_hosts

    def _origin_allowed(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin in self.cors_origins

    def _count(self, client: Any) -> bool:
        """Count a request on its connection; True when it is the connection's last one."""
        if client is None:
            return False
        key = tuple(client)
        served = self._served.pop(key, 0) + 1
        if served >= self.max_requests:
            return True  # the connection closes after this answer: forget it
        self._served[key] = served
        while len(self._served) > _TRACKED_CONNECTIONS:
            self._served.popitem(last=False)
        return False


def _with_headers(send: Send, origin: str | None, close: bool) -> Send:
    if origin is None and not close:
        return send

    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = list(message.get("headers") or [])
            if origin is not None:
                headers += [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]
            if close:
                headers.append((b"connection", b"close"))
            message = {**message, "headers": headers}
        await send(message)

    return wrapped


async def _preflight(send: Send, origin: str) -> None:
    headers = [
        (b"access-control-allow-origin", origin.encode("latin-1")),
        (b"access-control-allow-methods", _CORS_METHODS),
        (b"access-control-allow-headers", _CORS_HEADERS),
        (b"access-control-max-age", b"600"),
        (b"vary", b"Origin"),
        (b"content-length", b"0"),
    ]
    await send({"type": "http.response.start", "status": 204, "headers": headers})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _refuse(send: Send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}})
    data = body.encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
               (b"connection", b"close")]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data, "more_body": False})
