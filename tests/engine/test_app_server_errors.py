"""The app's local server when starting or stopping goes wrong: every serve request gets a `server`
event that says what failed (the app waits for it), the port is given back, and a server that
does not stop when asked is forced to, ending the turn it was streaming.
"""

from __future__ import annotations

import errno
import logging
import socket
import threading
import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from scripted_engine import ENDLESS, ScriptedEngine, load_tokenizer, scripted_loader
from server_harness import free_port
from stdio_harness import InProcess

import engine.serving.app_server as app_server
from engine.serving.app_server import LocalApiServer
from engine.serving.protocol import HelloEvent, LoadRequest, ServeRequest, ServerEvent
from engine.serving.service import EngineService


class Recorder:
    def __init__(self) -> None:
        self.events: list[ServerEvent] = []

    def __call__(self, event: ServerEvent) -> None:
        self.events.append(event)


@pytest.fixture
def local() -> Iterator[tuple[LocalApiServer, Recorder]]:
    recorder = Recorder()
    server = LocalApiServer(EngineService(), recorder)
    yield server, recorder
    server.close()


def test_a_host_name_that_cannot_be_encoded_is_answered_with_an_error_event() -> None:
    """Over stdio, as the app sends it: the serve request is answered, not dropped with a traceback."""
    io = InProcess(EngineService())
    try:
        assert isinstance(io.events.next(), HelloEvent)
        host = "b\u00fc" + "c" * 70  # one label longer than IDNA allows
        io.send({"type": "serve", "enabled": True, "host": host, "port": 0})
        event = io.events.until(lambda e: isinstance(e, ServerEvent), timeout=30)[-1]
        assert isinstance(event, ServerEvent) and not event.running
        assert event.error.startswith(f"could not listen on {host}:0: the host name cannot be used")
    finally:
        io.close()


def test_a_socket_family_this_machine_lacks_is_reported(local: tuple[LocalApiServer, Recorder],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def no_ipv6(family: int, kind: int) -> socket.socket:
        raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")

    fake = types.SimpleNamespace(**{k: getattr(socket, k) for k in ("AF_INET", "AF_INET6", "SOCK_STREAM", "SOL_SOCKET", "SO_REUSEADDR")},
                                 socket=no_ipv6)  # fmt: skip
    monkeypatch.setattr(app_server, "socket", fake)
    server, recorder = local
    event = server.apply(ServeRequest(enabled=True, host="::1", port=8080))
    assert recorder.events == [event] and not event.running and not server.running
    assert event.error == "could not listen on ::1:8080: Address family not supported by protocol"


def test_a_server_that_fails_to_start_is_reported_and_gives_the_port_back(
    local: tuple[LocalApiServer, Recorder], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    async def crash(self: Any, sockets: Any = None) -> None:
        raise RuntimeError("event loop policy refused")

    monkeypatch.setattr(uvicorn.Server, "serve", crash)
    server, recorder = local
    port = free_port()
    event = server.apply(ServeRequest(enabled=True, host="127.0.0.1", port=port))
    assert not event.running and event.error == f"the server on 127.0.0.1:{port} did not start"
    assert "the local API server stopped with an error" in caplog.text and "event loop policy refused" in caplog.text
    with socket.socket() as again:  # the listening socket was closed
        again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        again.bind(("127.0.0.1", port))


def test_an_unexpected_failure_while_starting_is_an_error_event_and_the_next_request_works(
    local: tuple[LocalApiServer, Recorder], monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    real_config = uvicorn.Config
    calls = [0]

    def config(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise ValueError("unsupported http implementation")
        return real_config(*args, **kwargs)

    monkeypatch.setattr(uvicorn, "Config", config)
    server, recorder = local
    failed = server.apply(ServeRequest(enabled=True, host="127.0.0.1", port=0))
    assert not failed.running
    assert failed.error == "could not start the server on 127.0.0.1:0: ValueError: unsupported http implementation"
    started = server.apply(ServeRequest(enabled=True, host="127.0.0.1", port=0))  # the lock was released
    assert started.running and server.running and started.port > 0
    assert httpx.get(f"http://127.0.0.1:{started.port}/health").json()["status"] == "not_loaded"
    stopped = server.apply(ServeRequest(enabled=False))
    assert not stopped.running and not server.running
    assert recorder.events == [failed, started, stopped]


def test_serving_beyond_loopback_without_a_key_warns(local: tuple[LocalApiServer, Recorder],
                                                      caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    server, _ = local
    caplog.set_level(logging.WARNING, "moebar.app_server")
    event = server.apply(ServeRequest(enabled=True, host="0.0.0.0", port=0))
    assert event.running, event.error
    assert "serving on 0.0.0.0: other machines that can reach it can use the model (no API key is set)" in caplog.text
    assert not server.apply(ServeRequest(enabled=False)).running


def test_a_server_that_does_not_stop_in_time_is_forced_and_its_turn_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), [ENDLESS])
    service = EngineService(loader=scripted_loader(engine))
    service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    recorder = Recorder()
    server = LocalApiServer(service, recorder)
    event = server.apply(ServeRequest(enabled=True, host="127.0.0.1", port=0))
    assert event.running
    streaming = threading.Event()
    ended: list[str] = []

    def client() -> None:
        body = {"model": "scripted", "messages": [{"role": "user", "content": "go"}], "stream": True, "max_tokens": 10**6}
        try:
            with httpx.stream("POST", f"http://127.0.0.1:{event.port}/v1/chat/completions", json=body, timeout=60) as r:
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        streaming.set()
        except httpx.HTTPError as exc:
            ended.append(type(exc).__name__)
        else:
            ended.append("closed")

    thread = threading.Thread(target=client, daemon=True)
    thread.start()
    assert streaming.wait(60)
    # a graceful stop waits for the open stream; after STOP_TIMEOUT_S it is forced
    monkeypatch.setattr(app_server, "STOP_TIMEOUT_S", 0.2)
    before = len(recorder.events)
    stopped = server.apply(ServeRequest(enabled=False))
    assert not stopped.running and not server.running
    assert engine.finished.wait(30) and engine.finish_reasons == ["cancelled"]  # the endless turn was stopped
    thread.join(30)
    assert ended  # the client saw its stream end
    # The request that ended during the stop sent no event of its own: the stop's answer is the
    # only one (an earlier "not running" would be taken for the answer by a client waiting for it).
    assert recorder.events[before:] == [stopped]
    service.close()
