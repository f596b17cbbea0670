"""Error paths of the stdio writer and ticker and of the HTTP server that other tests do not reach."""

from __future__ import annotations

import io
from typing import Any

import httpx
import pytest
from scripted_engine import ScriptedEngine, load_tokenizer, scripted_loader
from server_harness import ThreadedServer
from stdio_harness import InProcess, ManualTicks

import engine.serving.stdio_server as stdio_server
from engine.serving.http_server import create_app
from engine.serving.protocol import ErrorEvent, HelloEvent, ProtocolError, StatsEvent, UnloadedEvent, decode_event
from engine.serving.service import EngineService
from engine.serving.stdio_server import EventWriter


def test_an_event_that_cannot_be_encoded_is_reported_as_an_error_line(monkeypatch: pytest.MonkeyPatch) -> None:
    real = stdio_server.encode

    def encode(event: Any) -> str:
        if isinstance(event, UnloadedEvent):
            raise ProtocolError("unloaded: cannot encode field x (NaN)")
        return real(event)

    monkeypatch.setattr(stdio_server, "encode", encode)
    out = io.StringIO()
    EventWriter(out)(UnloadedEvent())
    (line,) = out.getvalue().splitlines()
    event = decode_event(line)
    assert isinstance(event, ErrorEvent) and event.code == "internal_error" and "cannot encode field x" in event.message


class _GoneReader(io.StringIO):
    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


def test_a_reader_that_went_away_stops_the_writer_quietly() -> None:
    writer = EventWriter(_GoneReader())
    writer(HelloEvent(pid=1))
    assert writer.closed
    writer(HelloEvent(pid=1))  # nothing raised, nothing tried


def test_a_failing_stats_sample_skips_one_tick_only(monkeypatch: pytest.MonkeyPatch) -> None:
    service = EngineService(loader=scripted_loader(ScriptedEngine(load_tokenizer("qwen3"), [])))
    real = service.live_figures
    calls = [0]

    def flaky() -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise RuntimeError("the engine was unloaded while sampling")
        return real()

    monkeypatch.setattr(service, "live_figures", flaky)
    ticks = ManualTicks()
    io_ = InProcess(service, stats_interval=0.5, idle_stats_interval=0.5, ticks=ticks)
    try:
        assert isinstance(io_.events.next(), HelloEvent)
        ticks.started()
        ticks.tick(1)  # the sample fails: no event, no crash
        assert io_.events.queue.empty()
        ticks.tick(1)
        assert isinstance(io_.events.next(), StatsEvent)
    finally:
        io_.close()


@pytest.fixture(scope="module")
def unloaded_server() -> Any:
    server = ThreadedServer(create_app(EngineService(), "m", None))
    yield server
    server.stop()


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_before_any_model_is_loaded_is_a_503(unloaded_server: Any, stream: bool) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    r = httpx.post(unloaded_server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "not_loaded"
