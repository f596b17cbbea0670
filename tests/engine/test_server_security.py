"""The OpenAI-compatible server's guard rails: loopback by default, the API key on every route but
/health (with no generation started for a refused request), and malformed HTTP answered with 4xx
while the server keeps serving.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
from scripted_engine import ScriptedEngine, load_tokenizer, scripted_loader
from server_harness import ThreadedServer, free_port

from engine.serving.http_server import create_app
from engine.serving.protocol import LoadRequest
from engine.serving.service import EngineService

ROOT = Path(__file__).resolve().parents[2]
KEY = "s3cret-Key_42"
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


class ScriptedServer(ThreadedServer):
    """uvicorn on a thread serving a scripted engine that records every prompt it is given."""

    def __init__(self, api_key: str | None = KEY, **guard: Any) -> None:
        self.engine = ScriptedEngine(load_tokenizer("qwen3"), ["ok"] * 100)
        service = EngineService(loader=scripted_loader(self.engine))
        service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
        super().__init__(create_app(service, "m", api_key, max_body_bytes=4096, **guard))

    def raw(self, request: bytes) -> bytes:
        """Send raw bytes and return the whole answer (the server closes after an error)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
        return answer


@pytest.fixture(scope="module")
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.stop()


CREDENTIALS = {
    "missing": {},
    "wrong": {"Authorization": "Bearer not-the-key"},
    "prefix-of-key": {"Authorization": f"Bearer {KEY[:-1]}"},
    "key-plus-suffix": {"Authorization": f"Bearer {KEY}x"},
    "other-case": {"Authorization": f"Bearer {KEY.upper()}"},
    "empty-bearer": {"Authorization": "Bearer"},
    "basic-scheme": {"Authorization": f"Basic {KEY}"},
    "no-scheme": {"Authorization": KEY},
    "other-header": {"X-API-Key": KEY, "Api-Key": KEY},
}
ROUTES = [("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/v1/chat/completions"),
          ("POST", "/v1/completions"), ("GET", "/nowhere"), ("GET", "/health/"), ("GET", "/Health"),
          ("GET", "//v1/models"), ("OPTIONS", "/v1/chat/completions"), ("HEAD", "/v1/models"),
          ("DELETE", "/v1/models")]  # fmt: skip


@pytest.mark.parametrize("credential", CREDENTIALS, ids=list(CREDENTIALS))
def test_every_route_but_health_refuses_a_missing_or_wrong_key(server: ScriptedServer, credential: str) -> None:
    headers = CREDENTIALS[credential]
    before = list(server.engine.prompts)  # the module's server: other tests may have been served
    for method, path in ROUTES:
        r = httpx.request(method, server.url + path, headers=headers, json=BODY if method == "POST" else None,
                          params={"api_key": KEY})  # a key in the query string does not count  # fmt: skip
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        if method != "HEAD":
            assert r.json()["error"]["code"] == "invalid_api_key"
    assert server.engine.prompts == before  # nothing refused reached the engine
    health = httpx.get(server.url + "/health", headers=headers)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_the_right_key_is_served(server: ScriptedServer) -> None:
    before = len(server.engine.prompts)
    r = httpx.post(server.url + "/v1/chat/completions", json=BODY, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "ok"
    assert len(server.engine.prompts) == before + 1


AUTH = f"Authorization: Bearer {KEY}\r\n".encode()
MALFORMED = {
    "garbage-request-line": b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n",
    "bad-content-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + AUTH + b"Content-Length: ten\r\n\r\n{}",
    "negative-content-length": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + AUTH
    + b"Content-Length: -5\r\n\r\n{}",
    "bad-chunk-size": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + AUTH
    + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "header-without-colon": b"GET /v1/models HTTP/1.1\r\nHost: localhost\r\n" + AUTH + b"this is not a header\r\n\r\n",
    "declared-body-over-limit": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + AUTH
    + b"Content-Type: application/json\r\nContent-Length: 999999999\r\n\r\n{",
    "body-not-utf8": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + AUTH
    + b"Content-Type: application/json\r\nContent-Length: 4\r\n\r\n\xff\xfe\xfd\xfc",
    "json-nested-deeply": b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + AUTH
    + b"Content-Type: application/json\r\nContent-Length: 4000\r\n\r\n" + b"[" * 4000,
}


@pytest.mark.parametrize("request_bytes", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_http_gets_4xx_and_the_server_goes_on(server: ScriptedServer, request_bytes: bytes) -> None:
    answer = server.raw(request_bytes)
    status = int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.1 ") else 0
    assert 400 <= status < 500, answer[:200]
    assert httpx.get(server.url + "/health").status_code == 200


def listening_addresses(pid: int, port: int) -> set[str]:
    """The addresses the process (or its children) listens on at `port`."""
    procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    return {c.laddr.ip for p in procs for c in p.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}  # fmt: skip


def test_serve_listens_on_loopback_only_by_default(tiny_model: Any) -> None:
    port = free_port()
    cmd = [sys.executable, "-m", "engine.cli", "serve", str(tiny_model("qwen3_moe")), "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not listening_addresses(proc.pid, port):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "the server never listened"
            time.sleep(0.2)
        assert listening_addresses(proc.pid, port) == {"127.0.0.1"}
        others = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                  if a.family == socket.AF_INET and not a.address.startswith("127.")]  # fmt: skip
        for address in others:  # not reachable from the network
            with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
                pass
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ------------------------------------------------------------------ web pages: Host, Origin, Content-Type

APP_ORIGIN = "https://app.example"


@pytest.fixture(scope="module")
def open_server() -> Iterator[ScriptedServer]:
    """No API key (the default on loopback), one web origin allowed, three requests per connection."""
    s = ScriptedServer(api_key=None, cors_origins=(APP_ORIGIN,), max_requests_per_connection=3)
    yield s
    s.stop()


FOREIGN_HOSTS = ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example:80",
                 "192.0.2.7", "[2001:db8::1]:8000", "0.0.0.0", ""]  # fmt: skip


@pytest.mark.parametrize("host", FOREIGN_HOSTS)
def test_a_host_that_is_not_this_machine_is_refused(open_server: ScriptedServer, host: str) -> None:
    """DNS rebinding: a page on the attacker's name resolved to 127.0.0.1 sends its own name as Host."""
    before = len(open_server.engine.prompts)
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/v1/models"), ("GET", "/health")]:
        r = httpx.request(method, open_server.url + path, headers={"Host": host}, json=BODY if method == "POST" else None)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_host", (host, path, r.text)
    assert len(open_server.engine.prompts) == before


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST.", "127.0.0.1", "127.1.2.3:9", "[::1]", "[::1]:8000",
                                  "app.localhost"])  # fmt: skip
def test_loopback_hosts_are_served(open_server: ScriptedServer, host: str) -> None:
    r = httpx.post(open_server.url + "/v1/chat/completions", headers={"Host": host}, json=BODY)
    assert r.status_code == 200, r.text


def test_the_configured_and_allowed_hosts_are_served() -> None:
    from engine.serving.http_guard import allowed_host_names, host_of

    assert allowed_host_names("192.168.1.4") >= {"192.168.1.4"}
    assert "mybox.lan" in allowed_host_names("127.0.0.1", ["MyBox.lan:8000"])
    assert "evil.example" not in allowed_host_names("0.0.0.0")
    own = {a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET}
    assert own <= allowed_host_names("0.0.0.0")  # a wildcard bind (the app's "other computers too") serves the LAN
    assert host_of("[::1]:80") == "::1" and host_of("Example.COM.:8000") == "example.com" and host_of("::1") == "::1"
    server = ScriptedServer(api_key=None, allowed_hosts=("mybox.lan",))
    try:
        assert httpx.post(server.url + "/v1/chat/completions", headers={"Host": "mybox.lan:80"}, json=BODY).status_code == 200
        assert httpx.post(server.url + "/v1/chat/completions", headers={"Host": "other.lan"}, json=BODY).status_code == 403
    finally:
        server.stop()


def test_a_web_page_of_a_foreign_origin_is_refused_and_its_preflight_too(open_server: ScriptedServer) -> None:
    before = len(open_server.engine.prompts)
    for origin in ["https://evil.example", "null", "http://localhost:3000", APP_ORIGIN + ".evil.example"]:
        r = httpx.post(open_server.url + "/v1/chat/completions", headers={"Origin": origin}, json=BODY)
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden_origin", (origin, r.text)
        assert "access-control-allow-origin" not in r.headers
        preflight = httpx.options(open_server.url + "/v1/chat/completions", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"})
        assert preflight.status_code == 403 and "access-control-allow-origin" not in preflight.headers
    assert len(open_server.engine.prompts) == before


def test_the_allowed_origin_gets_cors_headers_and_a_preflight(open_server: ScriptedServer) -> None:
    preflight = httpx.options(open_server.url + "/v1/chat/completions", headers={
        "Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "content-type" in preflight.headers["access-control-allow-headers"]
    r = httpx.post(open_server.url + "/v1/chat/completions", headers={"Origin": APP_ORIGIN}, json=BODY)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert r.json()["choices"][0]["message"]["content"] == "ok"


@pytest.mark.parametrize("content_type", [None, "text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx", "application/json-seq"])
def test_a_body_that_is_not_declared_json_is_refused_with_415(open_server: ScriptedServer, content_type: str | None) -> None:
    """A cross-site "simple" POST (text/plain, forms) needs no preflight: it must not run a generation."""
    import json as json_module

    before = len(open_server.engine.prompts)
    headers = {} if content_type is None else {"Content-Type": content_type}
    r = httpx.post(open_server.url + "/v1/chat/completions", content=json_module.dumps(BODY), headers=headers)
    assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type", r.text
    assert len(open_server.engine.prompts) == before
    ok = httpx.post(open_server.url + "/v1/chat/completions", content=json_module.dumps(BODY),
                    headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200, ok.text


def test_one_connection_serves_a_bounded_number_of_requests(open_server: ScriptedServer) -> None:
    with httpx.Client() as client:
        answers = [client.get(open_server.url + "/v1/models") for _ in range(7)]
    assert all(a.status_code == 200 for a in answers)
    closes = [a.headers.get("connection") == "close" for a in answers]
    assert closes == [False, False, True, False, False, True, False]  # the 3rd of each connection closes it


def test_serve_options_parse() -> None:
    from engine.serving.http_server import build_parser

    args = build_parser().parse_args(["m", "--cors-origin", "https://a.example", "--cors-origin", "*",
                                      "--allow-host", "box.lan", "--max-requests-per-connection", "5"])
    assert args.cors_origin == ["https://a.example", "*"] and args.allow_host == ["box.lan"]
    assert args.max_requests_per_connection == 5
    with pytest.raises(ValueError, match="at least 1"):
        from engine.serving.http_guard import RequestGuard

        RequestGuard(lambda *a: None, max_requests_per_connection=0)  # type: ignore[arg-type]
