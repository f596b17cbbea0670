"""The app's local server: the OpenAI API served from the engine process on the app's EngineService.

One model load serves both the stdio requests and the HTTP ones, and their turns never interleave tokens.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from engine.serving.protocol import DoneEvent, LoadRequest, ServerEvent, TokenTextEvent
from engine.serving.service import EngineService
from tests.engine.stdio_harness import InProcess

PROMPT = [{"role": "user", "content": "Tell me a long story about the sea"}]


@pytest.fixture(scope="module")
def engine_io(tiny_model: Any) -> Iterator[tuple[InProcess, EngineService]]:
    """One stdio loop on a loaded service for the module (closing the loop closes the service)."""
    svc = EngineService()
    svc.load(LoadRequest(model_dir=str(tiny_model("qwen3_moe"))), lambda ev: None)
    io = InProcess(svc)
    io.events.next()  # hello
    yield io, svc
    io.close()


@pytest.fixture
def serving(engine_io: tuple[InProcess, EngineService]) -> Iterator[tuple[InProcess, str]]:
    io, _ = engine_io
    event = _serve(io, enabled=True, host="127.0.0.1", port=0, api_key="secret")
    assert event.running and event.host == "127.0.0.1" and event.port > 0 and event.error == ""
    yield io, f"http://127.0.0.1:{event.port}"
    assert not _serve(io, enabled=False).running


@pytest.fixture
def service(engine_io: tuple[InProcess, EngineService]) -> EngineService:
    return engine_io[1]


def _serve(io: InProcess, **request: Any) -> ServerEvent:
    """Send a serve request and return the server event that answers it (older events are dropped first).

    A running server also sends a server event whenever an HTTP request ends, and the last one of a
    test can arrive after the drop: the answer to a stop is the first event that says it is not running.
    """
    while not io.events.queue.empty():
        io.events.queue.get_nowait()
    io.send({"type": "serve", **request})
    stopping = not request.get("enabled", True)
    answered = io.events.until(lambda ev: isinstance(ev, ServerEvent) and not (stopping and ev.running), timeout=60)
    return answered[-1]  # type: ignore[return-value]


def _http_answer(base: str, max_tokens: int) -> tuple[str, str]:
    """Stream a greedy completion; returns (request id, text)."""
    auth = {"Authorization": "Bearer secret"}
    model = httpx.get(f"{base}/v1/models", headers=auth).json()["data"][0]["id"]
    body = {"model": model, "messages": PROMPT, "stream": True, "max_tokens": max_tokens, "temperature": 0}
    parts, rid = [], ""
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120, headers=auth) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                rid = chunk["id"]
                delta = chunk["choices"][0]["delta"] if chunk.get("choices") else {}
                parts.append(delta.get("content") or delta.get("reasoning_content") or "")
    return rid, "".join(parts)


def test_the_server_shares_the_loaded_model(serving: tuple[InProcess, str], service: EngineService) -> None:
    io, base = serving
    engine = service.engine
    assert service.loaded is not None
    models = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer secret"}).json()
    assert [m["id"] for m in models["data"]] == [service.loaded.name]
    assert httpx.get(f"{base}/v1/models").status_code == 401  # the API key is required
    rid, text = _http_answer(base, 6)
    assert text and service.engine is engine  # answered by the model the app loaded, not a second one
    # The app saw the request running, then none.
    io.events.until(lambda ev: isinstance(ev, ServerEvent) and ev.active_requests == 1, timeout=10)
    io.events.until(lambda ev: isinstance(ev, ServerEvent) and ev.active_requests == 0, timeout=10)


def test_app_and_server_turns_never_interleave(serving: tuple[InProcess, str], service: EngineService,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    io, base = serving
    alone_rid, alone = _http_answer(base, 24)  # the same greedy request with nothing else running
    order: list[str] = []
    original = EngineService._emit_pieces

    def record(request_id: str, pieces: Any, emit: Any) -> None:
        order.extend(request_id for piece in pieces if piece.kind in ("reasoning", "answer"))
        original(request_id, pieces, emit)

    monkeypatch.setattr(EngineService, "_emit_pieces", staticmethod(record))
    results: list[tuple[str, str]] = []
    http_thread = threading.Thread(target=lambda: results.append(_http_answer(base, 24)))

    def start_http_on_first_app_token(ev: Any) -> None:
        if isinstance(ev, TokenTextEvent) and ev.id == "app-1" and not http_thread.is_alive() and not results:
            http_thread.start()

    io.events.hooks.append(start_http_on_first_app_token)
    io.send({"type": "chat", "id": "app-1", "messages": PROMPT, "sampling": {"max_tokens": 64, "temperature": 0}})
    app_turn = io.events.until(lambda ev: isinstance(ev, DoneEvent) and ev.id == "app-1")
    # The HTTP request arrived while the app's turn was running (so the two really competed).
    assert any(isinstance(ev, ServerEvent) and ev.active_requests == 1 for ev in app_turn)
    http_thread.join(120)
    (rid, text), = results
    assert text == alone  # the same tokens as when it ran alone
    assert "app-1" in order and rid in order
    blocks = [rid_ for i, rid_ in enumerate(order) if i == 0 or order[i - 1] != rid_]
    assert blocks == ["app-1", rid]  # one whole turn, then the other: never mixed


def test_port_in_use_is_reported_and_stop_closes_the_port(engine_io: tuple[InProcess, EngineService]) -> None:
    io, _ = engine_io
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        event = _serve(io, enabled=True, host="127.0.0.1", port=port)
        assert not event.running and f"127.0.0.1:{port}" in event.error and "in use" in event.error
    event = _serve(io, enabled=True, host="127.0.0.1", port=0)
    assert event.running
    assert httpx.get(f"http://127.0.0.1:{event.port}/health").json()["status"] == "ok"
    assert not _serve(io, enabled=False).running
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{event.port}/health")


def test_bad_serve_requests_name_the_field(engine_io: tuple[InProcess, EngineService]) -> None:
    io, _ = engine_io
    io.send({"type": "serve", "enabled": True, "port": 70000})
    error = io.events.until(lambda ev: getattr(ev, "field", None) is not None, timeout=10)[-1]
    assert getattr(error, "field", None) == "serve.port"
