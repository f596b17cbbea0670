"""The OpenAI-compatible server, driven by the official openai client (and raw httpx for abuse)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from scripted_engine import ENDLESS, ScriptedEngine, load_tokenizer, scripted_loader
from server_harness import ThreadedServer

from engine.serving.chat import render_prompt
from engine.serving.http_server import create_app, is_loopback
from engine.serving.protocol import ChatMessage, LoadRequest
from engine.serving.service import EngineService

KEY = "sekret-key"


class Server(ThreadedServer):
    """uvicorn on a thread, serving one EngineService."""

    def __init__(self, service: EngineService, api_key: str | None = KEY, max_body_bytes: int = 1 << 20) -> None:
        super().__init__(create_app(service, "tiny-moe", api_key, max_body_bytes=max_body_bytes))

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def real(tiny_model: Any) -> Iterator[tuple[Server, EngineService]]:
    svc = EngineService()
    svc.load(LoadRequest(model_dir=str(tiny_model("qwen3_moe"))), lambda ev: None)
    server = Server(svc)
    yield server, svc
    server.stop()
    svc.close()


def scripted_server(kind: str, replies: list[str | None], delay_s: float = 0.0, **kw: Any) -> tuple[Server, ScriptedEngine]:
    engine = ScriptedEngine(load_tokenizer(kind), replies, delay_s=delay_s)
    svc = EngineService(loader=scripted_loader(engine))
    svc.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    return Server(svc, **kw), engine


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]


def test_non_streamed_answer_with_usage(real: tuple[Server, EngineService]) -> None:
    server, svc = real
    r = server.client().chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=6, temperature=0)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("length", "stop")
    prompt = render_prompt(svc.engine.tokenizer, [ChatMessage(**m) for m in MESSAGES])
    assert r.usage.prompt_tokens == len(prompt)
    assert 1 <= r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.model == "tiny-moe" and r.id.startswith("chatcmpl-")


def test_streamed_answer_matches_the_whole_one(real: tuple[Server, EngineService]) -> None:
    server, _ = real
    client = server.client()
    whole = client.chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=8, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-moe", messages=MESSAGES, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    # the same conversation again: the prompt cache served all but the last prompt token
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == chunks[-1].usage.prompt_tokens - 1
    assert len({c.id for c in chunks}) == 1


def test_models_and_health(real: tuple[Server, EngineService]) -> None:
    server, _ = real
    assert [m.id for m in server.client().models.list().data] == ["tiny-moe"]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"


def test_wrong_or_missing_key_is_refused(real: tuple[Server, EngineService]) -> None:
    server, _ = real
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").chat.completions.create(model="tiny-moe", messages=MESSAGES, max_tokens=2)
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/chat/completions"), ("GET", "/nowhere")):
        r = httpx.request(method, server.url + path, json={"messages": MESSAGES})
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(server.url + "/v1/models", headers={"Authorization": "Basic " + KEY})
    assert r.status_code == 401


@pytest.mark.parametrize(
    ("content", "status", "param"),
    [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (b'{"messages": []}', 400, "messages"),
        (b'{"messages": [{"role": "robot", "content": "x"}]}', 400, "messages[0].role"),
        (b'{"messages": [{"role": "user", "content": "x"}], "temperature": 9}', 400, "temperature"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', 400, "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 3}', 400, "n"),
        (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400, "tools[0].function"),
        (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages[0].content[0]"),
        (b"\xff\xfe\x00garbage", 400, None),
        (b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", 400, None),
    ],
)
def test_malformed_requests_get_400(real: tuple[Server, EngineService], content: bytes, status: int, param: str | None) -> None:
    server, _ = real
    r = httpx.post(server.url + "/v1/chat/completions", content=content, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param


def test_oversized_body_gets_413_and_server_survives(real: tuple[Server, EngineService]) -> None:
    server, _ = real
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]})
    r = httpx.post(server.url + "/v1/chat/completions", content=big, headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit holds while reading
        for _ in range(40):
            yield b"x" * 65536

    r = httpx.post(server.url + "/v1/chat/completions", content=chunked(), headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413
    assert httpx.get(server.url + "/health").status_code == 200


def test_wrong_method_and_unknown_route(real: tuple[Server, EngineService]) -> None:
    server, _ = real
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(server.url + "/v1/chat/completions", headers=auth).status_code == 405
    r = httpx.get(server.url + "/v1/nothing", headers=auth)
    assert r.status_code == 404 and "error" in r.json()


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
TOOL_SCRIPTS = {
    "qwen3": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Bergen"}}\n</tool_call>',
    "qwen3_5": "<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n</parameter>\n</function>\n</tool_call>\n"
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nBergen\n</parameter>\n</function>\n</tool_call>",
}


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
def test_tool_call_round_trip(kind: str) -> None:
    server, engine = scripted_server(kind, [TOOL_SCRIPTS[kind], "Oslo 3, Bergen 5.", TOOL_SCRIPTS[kind]])
    try:
        client = server.client()
        msgs: list[Any] = [{"role": "user", "content": "Weather in Oslo and Bergen?"}]
        r = client.chat.completions.create(model="tiny-moe", messages=msgs, tools=[WEATHER])
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and not choice.message.content
        calls = choice.message.tool_calls
        assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Oslo"}, {"city": "Bergen"}]
        assert all(c.id and c.type == "function" and c.function.name == "get_weather" for c in calls)
        assert len({c.id for c in calls}) == 2

        msgs.append(choice.message.model_dump(exclude_none=True))
        for c, temp in zip(calls, ("3", "5")):
            msgs.append({"role": "tool", "tool_call_id": c.id, "content": json.dumps({"temp": temp})})
        r2 = client.chat.completions.create(model="tiny-moe", messages=msgs, tools=[WEATHER])
        assert r2.choices[0].message.content == "Oslo 3, Bergen 5." and r2.choices[0].finish_reason == "stop"
        prompt_text = engine.tokenizer.decode(engine.prompts[-1])
        assert prompt_text.count("<tool_response>") == 2 and "get_weather" in prompt_text

        # streamed: tool calls arrive as deltas with index, id and whole JSON arguments
        chunks = list(client.chat.completions.create(model="tiny-moe", messages=msgs[:1], tools=[WEATHER], stream=True))
        deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
        assert [d.index for d in deltas] == [0, 1] and all(d.id for d in deltas)
        assert [json.loads(d.function.arguments)["city"] for d in deltas] == ["Oslo", "Bergen"]
        assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    finally:
        server.stop()


def test_client_disconnect_mid_stream_stops_generation() -> None:
    server, engine = scripted_server("qwen3", [ENDLESS], delay_s=0.01)
    try:
        body = {"model": "tiny-moe", "messages": MESSAGES, "stream": True, "max_tokens": 100000}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
        assert engine.finished.wait(10), "generation still running after the client left"
        assert engine.finish_reasons == ["cancelled"]
    finally:
        server.stop()


def test_client_disconnect_while_waiting_for_a_whole_answer_stops_generation() -> None:
    server, engine = scripted_server("qwen3", [ENDLESS], delay_s=0.01)
    try:
        body = {"model": "tiny-moe", "messages": MESSAGES, "max_tokens": 100000}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=0.5)
        assert engine.finished.wait(10)
        assert engine.finish_reasons == ["cancelled"]
    finally:
        server.stop()


def test_no_key_configured_means_open_and_not_loaded_is_503() -> None:
    svc = EngineService(loader=scripted_loader(ScriptedEngine(load_tokenizer("qwen3"), [])))
    server = Server(svc, api_key=None)
    try:
        r = httpx.post(server.url + "/v1/chat/completions", json={"messages": MESSAGES})
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_loaded"
        assert httpx.get(server.url + "/health").json()["status"] == "not_loaded"
    finally:
        server.stop()


def test_loopback_detection() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")


def test_serve_command_end_to_end(tiny_model: Any) -> None:
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "engine.cli", "serve", str(tiny_model("qwen3_moe")), "--port", str(port), "--api-key", KEY]
    proc = subprocess.Popen(cmd, cwd=str(root), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, PYTHONPATH=str(root)))  # fmt: skip
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server never became healthy"
            time.sleep(0.2)
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        served = client.models.list().data[0].id
        r = client.chat.completions.create(model=served, messages=MESSAGES, max_tokens=3)
        assert r.usage.completion_tokens >= 1 and r.choices[0].message.content
        with pytest.raises(openai.NotFoundError) as missing:  # OpenAI's answer to a name it does not serve
            client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=3)
        assert missing.value.code == "model_not_found" and served in missing.value.message
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_reasoning_is_separate_from_content() -> None:
    reply = "<think>\nPlan it.\n</think>\n\nThe answer."
    server, _ = scripted_server("qwen3_5", [reply, reply])
    try:
        client = server.client()
        r = client.chat.completions.create(model="tiny-moe", messages=MESSAGES)
        msg = r.choices[0].message
        assert msg.content == "The answer." and (msg.model_extra or {}).get("reasoning_content") == "Plan it."
        chunks = list(client.chat.completions.create(model="tiny-moe", messages=MESSAGES, stream=True))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert "".join((d.model_extra or {}).get("reasoning_content") or "" for d in deltas) == "Plan it."
        assert "".join(d.content or "" for d in deltas) == "The answer."
    finally:
        server.stop()


def test_concurrent_requests_are_served_one_after_the_other() -> None:
    """Four requests in flight at once: the engine runs one generation at a time, never two."""
    engine = ScriptedEngine(load_tokenizer("qwen3"), [f"reply {i}" for i in range(4)], delay_s=0.005)
    svc = EngineService(loader=scripted_loader(engine))
    svc.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    server = Server(svc)
    gate = threading.Event()
    lock = threading.Lock()
    running, peak, started = [0], [0], [0]
    real_generate = engine.generate

    def generate(*args: Any, **kwargs: Any) -> Iterator[Any]:
        with lock:
            running[0] += 1
            started[0] += 1
            peak[0] = max(peak[0], running[0])
            first = started[0] == 1
        try:
            if first:
                assert gate.wait(60), "the other requests never arrived"
            yield from real_generate(*args, **kwargs)
        finally:
            with lock:
                running[0] -= 1

    engine.generate = generate  # type: ignore[method-assign]
    try:
        client = server.client()
        results: list[str] = []

        def ask() -> None:
            r = client.chat.completions.create(model="tiny-moe", messages=MESSAGES)
            results.append(r.choices[0].message.content or "")

        threads = [threading.Thread(target=ask) for _ in range(4)]
        for t in threads:
            t.start()
        # the first generation holds the engine thread until the other three wait behind it
        deadline = time.monotonic() + 60
        while svc._thread._calls.qsize() < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc._thread._calls.qsize() == 3 and started[0] == 1
        gate.set()
        for t in threads:
            t.join(timeout=60)
        assert sorted(results) == [f"reply {i}" for i in range(4)]
        assert engine.finish_reasons == ["stop"] * 4
        assert started[0] == 4 and peak[0] == 1  # never two generations at once
    finally:
        gate.set()
        server.stop()
