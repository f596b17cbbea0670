"""Error paths of the OpenAI-compatible server that a client rarely produces and the other tests
do not reach: a broken Content-Length, a client that goes away while the answer is being sent, a
model unloaded between the check and the turn, a malformed tool call in a stream, a listener that
is gone, and `serve`'s own argument and start-up errors.

The app is driven through ASGI directly (scripted receive/send), so each case is exact and fast.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from scripted_engine import ENDLESS, ScriptedEngine, load_tokenizer, scripted_loader

import engine.serving.http_server as http_server
from engine.serving.http_server import DEFAULT_MAX_BODY_BYTES, _read_json, _run_turn, create_app
from engine.serving.openai_format import APIError, parse_completion_request
from engine.serving.protocol import DoneEvent, LoadRequest, TokenTextEvent
from engine.serving.service import EngineService

BODY = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50}


def _scope(body: bytes, headers: dict[str, str] | None = None) -> dict[str, Any]:
    hdrs = {"host": "127.0.0.1:8000", "content-type": "application/json", "content-length": str(len(body)),
            **(headers or {})}  # fmt: skip
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in hdrs.items()], "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }  # fmt: skip


class Client:
    """One ASGI request: the body, then what ``after_body`` says receive() returns (by default it
    waits until the test releases it, as a connected client does)."""

    def __init__(self, body: bytes, after_body: list[dict[str, Any]] | None = None) -> None:
        self.body = body
        self.after_body = list(after_body or [])
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self._body_given = False

    async def receive(self) -> dict[str, Any]:
        if not self._body_given:
            self._body_given = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        if self.after_body:
            return self.after_body.pop(0)
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    @property
    def status(self) -> int:
        return int(next(m["status"] for m in self.sent if m["type"] == "http.response.start"))

    @property
    def text(self) -> str:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body").decode()


def _serve(app: Any, client: Client, headers: dict[str, str] | None = None) -> Client:
    async def go() -> None:
        try:
            await app(_scope(client.body, headers), client.receive, client.send)
        finally:
            client.gone.set()

    asyncio.run(go())
    return client


def _loaded(engine: ScriptedEngine, service_class: type[EngineService] = EngineService) -> EngineService:
    service = service_class(loader=scripted_loader(engine))
    service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    return service


def _sse(text: str) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in text.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------------------- the body


@pytest.mark.parametrize("declared", ["abc", "-5", "12 "])
def test_a_content_length_that_is_not_a_number_is_a_400(declared: str) -> None:
    from starlette.requests import Request

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    request = Request(_scope(b"{}", {"content-length": declared}), receive)
    with pytest.raises(APIError) as info:
        asyncio.run(_read_json(request, DEFAULT_MAX_BODY_BYTES))
    assert info.value.status == 400 and info.value.message == "bad Content-Length header"


def test_a_body_longer_than_declared_is_cut_at_the_limit_not_read_whole() -> None:
    from starlette.requests import Request

    chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True} for _ in range(3)]

    async def receive() -> dict[str, Any]:
        return chunks.pop(0) if chunks else {"type": "http.request", "body": b"", "more_body": False}

    request = Request(_scope(b"", {"content-length": "10"}), receive)  # declares 10, sends 1800
    with pytest.raises(APIError) as info:
        asyncio.run(_read_json(request, 1000))
    assert info.value.status == 413 and "limit of 1000 bytes" in info.value.message


# ---------------------------------------------------------------------------- during the answer


def test_a_client_that_goes_away_while_the_stream_is_sent_cancels_the_turn() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), [ENDLESS, "fine again"])
    service = _loaded(engine)
    app = create_app(service, "m")
    client = Client(json.dumps({**BODY, "stream": True, "max_tokens": 100000}).encode())
    real_send = client.send

    async def send(message: dict[str, Any]) -> None:
        if len(client.sent) >= 4:  # headers, the role chunk and two tokens went out
            raise ConnectionResetError(104, "Connection reset by peer")
        await real_send(message)

    client.send = send  # type: ignore[method-assign]
    _serve(app, client)
    assert engine.finished.wait(30) and engine.finish_reasons == ["cancelled"]
    assert client.status == 200 and len(_sse(client.text)) == 3  # what went out before the reset, nothing after
    again = _serve(app, Client(json.dumps(BODY).encode()))
    assert again.status == 200 and json.loads(again.text)["choices"][0]["message"]["content"] == "fine again"
    service.close()


def test_other_messages_while_waiting_do_not_count_as_a_disconnect() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["all of it"])
    service = _loaded(engine)
    # a client that sends an empty extra body message (as HTTP/1.1 pipelining can) and stays
    client = Client(json.dumps(BODY).encode(), after_body=[{"type": "http.request", "body": b"", "more_body": False}])
    _serve(create_app(service, "m"), client)
    assert client.status == 200 and json.loads(client.text)["choices"][0]["message"]["content"] == "all of it"
    assert engine.finish_reasons == ["stop"]
    service.close()


class _UnloadedMeanwhile(EngineService):
    """The model is unloaded between the server's check and the turn (the app unloaded it)."""

    def chat(self, *args: Any, **kwargs: Any) -> Any:
        self.unload()
        return super().chat(*args, **kwargs)


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_unloaded_before_the_turn_runs_is_a_503_naming_it(stream: bool) -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["never"])
    service = _loaded(engine, _UnloadedMeanwhile)
    client = _serve(create_app(service, "m"), Client(json.dumps({**BODY, "stream": stream}).encode()))
    assert client.status == 503
    error = json.loads(client.text)["error"]
    assert error["code"] == "not_loaded" and "no model is loaded" in error["message"]
    assert engine.prompts == [] and engine.closed
    service.close()


def test_a_malformed_tool_call_in_a_stream_is_left_out_and_the_stream_ends_normally() -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["Checking.<tool_call>\nnot json at all\n</tool_call>"])
    service = _loaded(engine)
    body = {**BODY, "stream": True, "tools": tools, "chat_template_kwargs": {"enable_thinking": False}}
    client = _serve(create_app(service, "m"), Client(json.dumps(body).encode()))
    assert client.status == 200
    events = _sse(client.text)
    assert events[-1] == "[DONE]"
    assert not any(isinstance(e, dict) and "error" in e for e in events)  # the bad call is not an error event
    deltas = [e["choices"][0] for e in events if isinstance(e, dict) and e.get("choices")]
    text = "".join(d["delta"].get("content", "") for d in deltas)
    assert "Checking." in text and "not json" not in text  # the markup is not answer text either
    assert not any("tool_calls" in d["delta"] for d in deltas)
    assert deltas[-1]["finish_reason"] == "stop"
    service.close()


def test_a_turn_whose_listener_is_gone_is_cancelled() -> None:
    """The event loop of the request closed (server shutting down) while the turn still runs."""
    loop_closed = threading.Event()
    finished = threading.Event()
    seen_cancel: list[bool] = []

    class Service:
        engine = object()

        def chat(self, req: Any, emit: Callable[[Any], None], cancelled: Callable[[], bool]) -> DoneEvent:
            emit(TokenTextEvent(id=req.id, text="first"))
            assert loop_closed.wait(30)
            emit(TokenTextEvent(id=req.id, text="nobody hears this"))
            seen_cancel.append(cancelled())
            finished.set()
            return DoneEvent(id=req.id, finish_reason="cancelled")

    cancel = threading.Event()
    parsed = parse_completion_request(BODY)

    async def first_event() -> Any:
        events = _run_turn(Service(), parsed, cancel)  # type: ignore[arg-type]
        return await events.__anext__()

    assert isinstance(asyncio.run(first_event()), TokenTextEvent)  # asyncio.run closes the loop
    loop_closed.set()
    assert finished.wait(30)  # the worker thread set cancel when it found the loop closed
    assert seen_cancel == [True] and cancel.is_set()


# ---------------------------------------------------------------------------- `serve` itself


def test_serve_refuses_a_folder_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    missing = tmp_path / "no-such-model"
    assert main(["serve", str(missing)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {missing}: not a model directory"


@pytest.mark.parametrize("value", ["0", "-3"])
def test_serve_refuses_fewer_than_one_request_per_connection(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        http_server.main(["/m", "--max-requests-per-connection", value])
    assert info.value.code == 2
    assert f"--max-requests-per-connection must be at least 1, got {value}" in capsys.readouterr().err


def test_another_rank_follows_instead_of_serving_http(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    from engine.serving import replicated

    monkeypatch.setattr(replicated, "service_for_this_rank", lambda: (EngineService(), lambda: 3))
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: pytest.fail("a follower must not serve HTTP"))
    assert http_server.run_server(tmp_path) == 3


def test_serve_on_a_public_address_without_a_key_warns_and_closes_the_service_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import uvicorn

    from engine.serving import replicated

    engine = ScriptedEngine(load_tokenizer("qwen3"), [])
    service = EngineService(loader=scripted_loader(engine))
    monkeypatch.setattr(replicated, "service_for_this_rank", lambda: (service, None))
    served: dict[str, Any] = {}

    def run(app: Any, host: str, port: int, log_level: str) -> None:
        served.update(host=host, port=port, loaded=service.engine is engine)
        raise KeyboardInterrupt  # the user stops the server

    monkeypatch.setattr(uvicorn, "run", run)
    caplog.set_level(logging.WARNING, "moebar.http")
    with pytest.raises(KeyboardInterrupt):
        http_server.main([str(tmp_path), "--host", "0.0.0.0", "--port", "8123"])
    assert served == {"host": "0.0.0.0", "port": 8123, "loaded": True}
    assert "serving on 0.0.0.0 without --api-key" in caplog.text
    assert engine.closed  # the model was released although the server stopped with an exception


def test_a_turns_events_end_with_its_done() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["short"])
    service = _loaded(engine)

    async def all_events() -> list[Any]:
        return [ev async for ev in _run_turn(service, parse_completion_request(BODY), threading.Event())]

    events = asyncio.run(all_events())  # a consumer that reads past the done is not left waiting
    assert isinstance(events[-1], DoneEvent) and events[-1].finish_reason == "stop"
    assert "".join(e.text for e in events if isinstance(e, TokenTextEvent)) == "short"
    service.close()


def test_python_m_http_server_is_the_serve_command() -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "engine.serving.http_server", "/m", "--max-requests-per-connection", "0"],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "moebar-engine serve: error: --max-requests-per-connection must be at least 1, got 0" in proc.stderr
