"""`moebar-engine stdio`: full turns against tiny models, prompt-cache reuse, cancel, bad lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from scripted_engine import ENDLESS, ScriptedEngine, load_tokenizer, scripted_loader
from stdio_harness import ROOT, InProcess, ManualTicks, Subprocess

from engine.serving.chat import render_prompt
from engine.serving.protocol import (
    ChatMessage,
    DoneEvent,
    ErrorEvent,
    HelloEvent,
    LoadedEvent,
    ProgressEvent,
    StatsEvent,
    TokenTextEvent,
    ToolCallEvent,
    UnloadedEvent,
)
from engine.serving.service import EngineService

GREEDY = {"temperature": 0.0, "max_tokens": 10}


def is_done(rid: str) -> Any:
    return lambda ev: isinstance(ev, DoneEvent) and ev.id == rid


def answer_of(events: list[Any], rid: str) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenTextEvent) and e.id == rid and e.kind == "answer")


def chat(rid: str, messages: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"type": "chat", "id": rid, "messages": messages, "sampling": GREEDY, **extra}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_full_turns_over_stdio_reuse_the_prompt_cache(tiny_model: Any, model_type: str) -> None:
    model = tiny_model(model_type)
    proc = Subprocess()
    try:
        ev = proc.events.next(timeout=120)
        assert isinstance(ev, HelloEvent) and ev.protocol == 1
        proc.send({"type": "load", "model_dir": str(model)})
        loading = proc.events.until(lambda e: isinstance(e, (LoadedEvent, ErrorEvent)), timeout=300)
        loaded = loading[-1]
        assert isinstance(loaded, LoadedEvent), loading
        assert any(isinstance(e, ProgressEvent) for e in loading)
        assert loaded.model_type == model_type and loaded.supports_tools and loaded.plan

        first = [{"role": "user", "content": "Hello there"}]
        proc.send(chat("t1", first))
        turn1 = proc.events.until(is_done("t1"))
        done1 = turn1[-1]
        tokens1 = [e for e in turn1 if isinstance(e, TokenTextEvent)]
        assert tokens1 and done1.finish_reason in ("stop", "length")
        assert any(isinstance(e, StatsEvent) and e.id == "t1" for e in turn1)
        assert done1.figures.reused_tokens == 0 and done1.figures.generated_tokens >= 1

        second = [*first, {"role": "assistant", "content": answer_of(turn1, "t1")}, {"role": "user", "content": "And?"}]
        proc.send(chat("t2", second))
        turn2 = proc.events.until(is_done("t2"))
        done2 = turn2[-1]

        tok = load_tokenizer("qwen3")
        prompt1 = render_prompt(tok, [ChatMessage(role="user", content="Hello there")])
        prompt2 = render_prompt(tok, [ChatMessage(**m) for m in second])
        assert prompt2[: len(prompt1)] == prompt1  # this template keeps turn 1's prompt as a prefix
        assert len(prompt1) <= done2.figures.reused_tokens < len(prompt2)
        assert done2.figures.reused_tokens + done2.figures.prompt_tokens == len(prompt2)

        # A cold run of the same conversation (fresh load: empty prompt cache) gives the same text.
        proc.send({"type": "unload"})
        proc.events.until(lambda e: isinstance(e, UnloadedEvent))
        proc.send({"type": "load", "model_dir": str(model)})
        proc.events.until(lambda e: isinstance(e, LoadedEvent), timeout=300)
        proc.send(chat("t2cold", second))
        cold = proc.events.until(is_done("t2cold"))
        assert cold[-1].figures.reused_tokens == 0
        assert answer_of(cold, "t2cold") == answer_of(turn2, "t2")
        assert cold[-1].figures.generated_tokens == done2.figures.generated_tokens
        assert proc.close() == 0
    finally:
        if proc.proc.poll() is None:
            proc.proc.kill()
    assert proc.events.bad_lines == []  # stdout held protocol lines only


@pytest.fixture
def real_service(tiny_model: Any) -> Any:
    """A loaded service per test: a StdioServer closes its service when its input ends."""
    from engine.serving.protocol import LoadRequest

    svc = EngineService()
    svc.load(LoadRequest(model_dir=str(tiny_model("qwen3_moe"))), lambda ev: None)
    yield svc
    svc.close()


def test_cancel_stops_within_one_token(real_service: EngineService) -> None:
    io = InProcess(real_service)
    try:
        io.events.next()  # hello
        sent = []

        def cancel_on_first_token(ev: Any) -> None:
            if isinstance(ev, TokenTextEvent) and not sent:
                sent.append(ev)
                io.server._handle_line('{"v":1,"type":"cancel","id":"c1"}\n')  # as the reader would, at once

        io.events.hooks.append(cancel_on_first_token)
        msgs = [{"role": "user", "content": "Count to a thousand"}]
        io.send({"type": "chat", "id": "c1", "messages": msgs, "sampling": {"max_tokens": 500}, "thinking": False})
        events = io.events.until(is_done("c1"))
        done = events[-1]
        assert done.finish_reason == "cancelled"
        assert done.figures.generated_tokens <= 2  # the token being shown, at most one more
        assert sum(isinstance(e, TokenTextEvent) for e in events) <= 2
        # the engine still serves afterwards
        io.send({"type": "chat", "id": "c2", "messages": msgs, "sampling": {"max_tokens": 3}})
        assert io.events.until(is_done("c2"))[-1].finish_reason == "length"
    finally:
        io.close()


def test_cancel_of_a_queued_chat_and_of_unknown_ids(real_service: EngineService) -> None:
    io = InProcess(real_service)
    try:
        io.events.next()
        msgs = [{"role": "user", "content": "hi"}]
        io.send({"type": "chat", "id": "long", "messages": msgs, "sampling": {"max_tokens": 60}})
        io.send({"type": "chat", "id": "queued", "messages": msgs})
        io.send({"type": "cancel", "id": "queued"})
        io.send({"type": "cancel", "id": "nobody"})
        io.send({"type": "cancel", "id": "long"})
        events = io.events.until(is_done("queued"))
        dones = {e.id: e for e in events if isinstance(e, DoneEvent)}
        assert dones["queued"].finish_reason == "cancelled"
        assert dones["long"].finish_reason == "cancelled"
        assert not [e for e in events if isinstance(e, ErrorEvent)]
        assert not [e for e in events if isinstance(e, TokenTextEvent) and e.id == "queued"]
    finally:
        io.close()


@pytest.fixture()
def unloaded() -> InProcess:
    io = InProcess(EngineService(loader=scripted_loader(ScriptedEngine(load_tokenizer("qwen3"), []))))
    assert isinstance(io.events.next(), HelloEvent)
    yield io
    io.close()


@pytest.mark.parametrize(
    ("text", "code", "field"),
    [
        ("this is not json\n", "bad_request", None),
        ("[1, 2]\n", "bad_request", None),
        ('{"v":1,"type":"chat","id":"x"}\n', "bad_request", "chat.messages"),
        ('{"v":1,"type":"dance","id":"x"}\n', "unknown_type", "type"),
        ('{"v":99,"type":"chat","id":"x","messages":[]}\n', "version_mismatch", "v"),
        ('{"v":1,"type":"chat","id":"x","messages":[{"role":"user"}],"sampling":{"temperature":-1}}\n', "bad_request", "chat.sampling.temperature"),
        ("\ufffd\x00\x07{\n", "bad_request", None),
    ],
)
def test_bad_lines_get_an_error_and_the_loop_goes_on(unloaded: InProcess, text: str, code: str, field: str | None) -> None:
    unloaded.send(text)
    ev = unloaded.events.next()
    assert isinstance(ev, ErrorEvent) and ev.code == code and ev.field == field and ev.usable
    if '"id":"x"' in text:
        assert ev.id == "x"
    unloaded.send({"type": "unload"})
    assert isinstance(unloaded.events.next(), UnloadedEvent)


def test_chat_before_load_is_refused_with_error_and_done(unloaded: InProcess) -> None:
    unloaded.send(chat("early", [{"role": "user", "content": "hi"}]))
    events = unloaded.events.until(lambda e: isinstance(e, DoneEvent))
    err, done = [e for e in events if not isinstance(e, StatsEvent)]
    assert isinstance(err, ErrorEvent) and err.code == "not_loaded" and err.id == "early" and err.usable
    assert isinstance(done, DoneEvent) and done.id == "early" and done.finish_reason == "error"


def test_load_error_is_reported_and_engine_stays_usable(tmp_path: Path) -> None:
    io = InProcess(EngineService())
    try:
        io.events.next()
        io.send({"type": "load", "model_dir": str(tmp_path / "missing")})
        ev = io.events.until(lambda e: isinstance(e, ErrorEvent), timeout=60)[-1]
        assert ev.usable and str(tmp_path / "missing") in ev.message
        io.send({"type": "unload"})
        assert isinstance(io.events.until(lambda e: isinstance(e, UnloadedEvent))[-1], UnloadedEvent)
    finally:
        io.close()


def test_duplicate_chat_id_is_refused() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), [ENDLESS], delay_s=0.01)
    io = InProcess(EngineService(loader=scripted_loader(engine)))
    try:
        io.events.next()
        io.send({"type": "load", "model_dir": "/scripted"})
        io.events.until(lambda e: isinstance(e, LoadedEvent))
        io.send(chat("same", [{"role": "user", "content": "a"}], sampling={"max_tokens": 10000}))
        io.send(chat("same", [{"role": "user", "content": "b"}]))
        err = io.events.until(lambda e: isinstance(e, ErrorEvent))[-1]
        assert err.code == "duplicate_id" and err.id == "same"
        io.send({"type": "cancel", "id": "same"})
        assert io.events.until(is_done("same"))[-1].finish_reason == "cancelled"
    finally:
        io.close()


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
    },
}
SCRIPTS = {
    "qwen3": '<think>\nNeed weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>',
    "qwen3_5": "<think>\nNeed weather.\n</think>\n\n<tool_call>\n<function=get_weather>\n<parameter=city>\nOslo\n"
    "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>",
}


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
def test_tool_call_text_becomes_tool_call_events(kind: str) -> None:
    engine = ScriptedEngine(load_tokenizer(kind), [SCRIPTS[kind], "It is 3 degrees."])
    io = InProcess(EngineService(loader=scripted_loader(engine)))
    try:
        io.events.next()
        io.send({"type": "load", "model_dir": "/scripted"})
        io.events.until(lambda e: isinstance(e, LoadedEvent))
        msgs = [{"role": "user", "content": "Weather in Oslo?"}]
        io.send({"type": "chat", "id": "w1", "messages": msgs, "tools": [WEATHER]})
        events = io.events.until(is_done("w1"))
        calls = [e for e in events if isinstance(e, ToolCallEvent)]
        assert len(calls) == 1
        assert (calls[0].name, calls[0].arguments) == ("get_weather", {"city": "Oslo", "days": 2})
        assert calls[0].call_id.startswith("call_")
        texts = [e for e in events if isinstance(e, TokenTextEvent)]
        assert "".join(t.text for t in texts if t.kind == "reasoning") == "Need weather."
        assert not [t for t in texts if t.kind == "answer"]  # no markup leaks as answer text
        assert events[-1].finish_reason == "tool_calls"

        follow = [
            *msgs,
            {"role": "assistant", "content": "", "tool_calls": [{"id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments}]},
            {"role": "tool", "content": '{"temp": 3}', "tool_call_id": calls[0].call_id, "name": "get_weather"},
        ]
        io.send({"type": "chat", "id": "w2", "messages": follow, "tools": [WEATHER]})
        events = io.events.until(is_done("w2"))
        assert answer_of(events, "w2") == "It is 3 degrees." and events[-1].finish_reason == "stop"
        assert "<tool_response>" in engine.tokenizer.decode(engine.prompts[-1])
    finally:
        io.close()


def test_malformed_tool_call_is_an_error_event_not_text() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ['<tool_call>\n{"name": broken\n</tool_call>'])
    io = InProcess(EngineService(loader=scripted_loader(engine)))
    try:
        io.events.next()
        io.send({"type": "load", "model_dir": "/scripted"})
        io.events.until(lambda e: isinstance(e, LoadedEvent))
        io.send({"type": "chat", "id": "m", "messages": [{"role": "user", "content": "x"}], "tools": [WEATHER]})
        events = io.events.until(is_done("m"))
        assert [e.code for e in events if isinstance(e, ErrorEvent)] == ["bad_tool_call"]
        assert answer_of(events, "m") == "" and events[-1].finish_reason == "stop"
    finally:
        io.close()


def test_stats_event_on_every_tick_while_working() -> None:
    """Busy: one stats event per stats interval (a manual clock: counted per tick, not per second)."""
    engine = ScriptedEngine(load_tokenizer("qwen3"), [ENDLESS], delay_s=0.01)
    ticks = ManualTicks()
    io = InProcess(EngineService(loader=scripted_loader(engine)), stats_interval=0.5, ticks=ticks)
    try:
        io.events.next()
        io.send({"type": "load", "model_dir": "/scripted"})
        io.events.until(lambda e: isinstance(e, LoadedEvent))
        io.send(chat("s", [{"role": "user", "content": "go"}], sampling={"max_tokens": 100000}))
        io.events.until(lambda e: isinstance(e, TokenTextEvent) and e.id == "s")  # working now
        ticks.started()
        ticks.tick(3)  # each tick's event is written before tick() returns
        so_far = []
        while not io.events.queue.empty():
            so_far.append(io.events.next())
        stats = [e for e in so_far if isinstance(e, StatsEvent)]
        assert len(stats) == 3
        last = stats[-1]
        assert last.id == "s" and last.figures.generated_tokens > 0 and last.figures.rss_bytes > 0
        assert last.figures.pressure_level in ("normal", "warning", "critical")
        io.send({"type": "cancel", "id": "s"})
        rest = io.events.until(is_done("s"))
        assert len([e for e in rest if isinstance(e, StatsEvent)]) == 1  # the turn's own, at its end
    finally:
        io.close()


def test_idle_stats_come_every_idle_interval_only() -> None:
    """Idle: a stats event once per idle interval (2.0 s = four 0.5 s ticks), none in between."""
    ticks = ManualTicks()
    io = InProcess(EngineService(loader=scripted_loader(ScriptedEngine(load_tokenizer("qwen3"), []))),
                   stats_interval=0.5, idle_stats_interval=2.0, ticks=ticks)
    try:
        io.events.next()  # hello
        ticks.started()
        ticks.tick(3)
        assert io.events.queue.empty()
        ticks.tick(1)
        assert isinstance(io.events.next(), StatsEvent)
        ticks.tick(7)
        assert isinstance(io.events.next(), StatsEvent)  # the 4th of these 7; the last 3 give none
        assert io.events.queue.empty()
    finally:
        io.close()


def test_stray_prints_go_to_stderr_not_the_protocol() -> None:
    code = (
        "import os; from engine.serving.stdio_server import _protocol_stdout\n"
        "out = _protocol_stdout(); print('stray print'); os.write(1, b'raw fd write\\n')\n"
        "out.write('protocol line\\n'); out.flush()\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=str(ROOT), capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "protocol line\n"
    assert "stray print" in res.stderr and "raw fd write" in res.stderr


@pytest.mark.parametrize("entry", [["engine.serving.stdio_server"], ["engine.cli", "stdio"]], ids=["module", "cli"])
def test_end_of_input_shuts_down_cleanly(entry: list[str]) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", *entry],
        input='{"v":1,"type":"unload"}\n',
        cwd=str(ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0
    kinds = [l.split('"type": "')[1].split('"')[0] for l in proc.stdout.splitlines()]
    assert kinds == ["hello", "unloaded"]


def test_overlong_line_is_dropped_with_an_error(unloaded: InProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.serving.stdio_server as stdio_server

    monkeypatch.setattr(stdio_server, "MAX_LINE_CHARS", 100)
    unloaded.send('{"v":1,"type":"chat","id":"big","messages":[{"role":"user","content":"' + "x" * 500 + '"}]}\n')
    unloaded.send({"type": "unload"})
    err = unloaded.events.next()
    assert isinstance(err, ErrorEvent) and "longer than 100" in err.message and err.usable
    assert isinstance(unloaded.events.next(), UnloadedEvent)  # the rest of the long line was not read as a request
