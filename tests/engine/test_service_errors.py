"""Error paths of the EngineService and the stdio loop around it that the other tests do not reach.

A closed service refuses by name; a model without a tool-call format refuses tools naming the
field; a cancelled call queued on the engine thread never runs and does not stall the next one;
a template that fails or a prefill cancelled before the prompt-cache snapshot leave no wrong
cache state; end of input cancels a running chat (its `done` still arrives, nothing is lost);
bad stdio options are refused before anything starts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from scripted_engine import ENDLESS, ScriptedEngine, load_tokenizer, scripted_loader
from stdio_harness import InProcess

import engine.serving.service as service_module
from engine.errors import RequestError
from engine.serving.protocol import (
    ChatMessage,
    ChatRequest,
    DoneEvent,
    ErrorEvent,
    HelloEvent,
    LoadedEvent,
    LoadRequest,
    StatsEvent,
    TokenTextEvent,
    UnloadedEvent,
)
from engine.serving.service import EngineService, _EngineThread, prompt_cache_bound
from engine.types import SamplingParams


def _loaded(engine: ScriptedEngine) -> EngineService:
    service = EngineService(loader=scripted_loader(engine))
    service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    return service


def _chat(rid: str = "c", content: str = "hi", **extra: Any) -> ChatRequest:
    return ChatRequest(id=rid, messages=[ChatMessage(role="user", content=content)], thinking=False, **extra)


# ---------------------------------------------------------------------------- closed service


def test_a_closed_service_refuses_every_call_by_name() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["hello"])
    service = _loaded(engine)
    service.close()
    assert engine.closed  # closing unloaded the model
    with pytest.raises(RequestError, match="the engine service is closed"):
        service.chat(_chat(), lambda ev: None, lambda: False)
    with pytest.raises(RequestError, match="the engine service is closed"):
        service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
    service.close()  # a second close is a no-op, not an error


def test_a_closed_service_answers_a_chat_over_stdio_with_an_error_and_done() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["hello"])
    service = _loaded(engine)
    service.close()
    io = InProcess(service)
    try:
        assert isinstance(io.events.next(), HelloEvent)
        io.send({"type": "chat", "id": "late", "messages": [{"role": "user", "content": "hi"}]})
        events = [e for e in io.events.until(lambda e: isinstance(e, DoneEvent)) if not isinstance(e, StatsEvent)]
        err, done = events
        assert isinstance(err, ErrorEvent) and err.id == "late" and err.code == "bad_request"
        assert "closed" in err.message and err.usable
        assert isinstance(done, DoneEvent) and done.finish_reason == "error"
    finally:
        io.close()


# ---------------------------------------------------------------------------- the engine thread


def test_a_call_cancelled_while_queued_never_runs_and_the_next_one_does() -> None:
    thread = _EngineThread()
    release = threading.Event()
    running = threading.Event()
    ran: list[str] = []

    def first() -> str:
        running.set()
        assert release.wait(30)
        ran.append("first")
        return "first"

    f1 = thread.submit(first)
    assert running.wait(30)
    f2 = thread.submit(ran.append, "second")
    assert f2.cancel()  # still queued behind `first`
    f3 = thread.submit(lambda: ran.append("third") or "third")
    release.set()
    assert f1.result(30) == "first" and f3.result(30) == "third"
    assert ran == ["first", "third"] and f2.cancelled()


def test_an_exception_on_the_engine_thread_reaches_the_caller_and_the_thread_goes_on() -> None:
    thread = _EngineThread()

    def fail() -> None:
        raise ValueError("bad shard header in model-00002.safetensors")

    with pytest.raises(ValueError, match="model-00002.safetensors"):
        thread.submit(fail).result(30)
    assert thread.submit(lambda: 42).result(30) == 42


# ---------------------------------------------------------------------------- tools


class _NoToolsTokenizer:
    """The real tokenizer with its tool-call format hidden (a model whose template has none)."""

    tool_parser = None
    tool_call_start = None
    tool_call_end = None

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def test_tools_for_a_model_without_a_tool_format_are_refused_naming_the_field() -> None:
    engine = ScriptedEngine(_NoToolsTokenizer(load_tokenizer("qwen3")), ["fine"])
    service = _loaded(engine)
    try:
        assert service.loaded is not None and not service.loaded.supports_tools
        with pytest.raises(RequestError, match=r"chat\.tools: the model scripted has no tool-call format"):
            service.chat(_chat(tools=[WEATHER]), lambda ev: None, lambda: False)
        assert engine.prompts == []  # nothing was generated
        texts: list[str] = []
        done = service.chat(_chat(), lambda ev: texts.append(ev.text) if isinstance(ev, TokenTextEvent) else None,
                            lambda: False)
        assert done.finish_reason == "stop" and "".join(texts) == "fine"  # the next turn is served
    finally:
        service.close()


# ---------------------------------------------------------------------------- prompt-cache snapshots


class _Untrimmable:
    """A cache entry with mlx-lm's interface as the prompt cache reads it: not trimmable, an offset."""

    nbytes = 16

    def __init__(self) -> None:
        self.offset = 0

    def is_trimmable(self) -> bool:
        return False


class _UntrimmableEngine(ScriptedEngine):
    """A scripted engine whose KV cache cannot be trimmed (as a model with linear attention), so
    the service takes prompt-cache snapshots; the cache's offset counts the tokens fed."""

    def make_kv_cache(self) -> list[Any]:
        return [_Untrimmable()]

    def generate(self, prompt_tokens: Any, sampling: SamplingParams, stop: Any = None, kv_cache: Any = None,
                 reused_tokens: int = 0, on_prefill: Any = None) -> Iterator[Any]:  # fmt: skip
        fed = False
        for ev in super().generate(prompt_tokens, sampling, stop, kv_cache, reused_tokens, on_prefill):
            if kv_cache and not fed and ev.token != -1:
                kv_cache[0].offset = reused_tokens + len(prompt_tokens)  # the prefill is done
                fed = True
            yield ev


def test_a_template_that_refuses_the_probe_just_skips_the_snapshot(monkeypatch: pytest.MonkeyPatch) -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["answer"])
    service = _loaded(engine)
    real = service_module.render_prompt
    calls = [0]

    def render(tok: Any, messages: Any, *args: Any, **kwargs: Any) -> list[int]:
        calls[0] += 1
        if calls[0] > 1:  # the probe of the next turn: this template refuses it
            raise RequestError("chat template rejected the conversation: roles must alternate")
        return real(tok, messages, *args, **kwargs)

    monkeypatch.setattr(service_module, "render_prompt", render)
    request = _chat()
    assert service._snapshot_points(request, real(engine.tokenizer, request.messages, (), False)) == (None, False)
    service.close()


def test_a_prefill_cancelled_before_the_snapshot_ends_the_turn_cancelled_and_stores_nothing() -> None:
    tok = load_tokenizer("qwen3")
    engine = _UntrimmableEngine(tok, ["never"])
    service = _loaded(engine)
    cancel = threading.Event()
    events: list[Any] = []

    def emit(ev: Any) -> None:
        events.append(ev)
        if type(ev).__name__ == "PrefillEvent" and ev.layers_done == 0:
            cancel.set()  # the user cancels as soon as the prefill starts

    messages = [ChatMessage(role="user", content="a"), ChatMessage(role="assistant", content="b"),
                ChatMessage(role="user", content="c")]  # fmt: skip
    request = ChatRequest(id="x", messages=messages, thinking=False)
    prompt = service_module.render_prompt(tok, messages, (), False)
    split, at_end = service._snapshot_points(request, prompt)
    # Qwen3 with thinking off adds an empty <think> block the next turn will not have: split mid-prompt
    assert split is not None and 0 < split < len(prompt) and not at_end
    done = service.chat(request, emit, cancel.is_set)
    assert done.finish_reason == "cancelled"
    assert not any(isinstance(e, TokenTextEvent) for e in events)
    assert len(service.prompt_cache) == 0
    service.close()


def test_prompt_cache_bound_under_a_memory_limit_is_the_budgets_kv_room() -> None:
    class Plan:
        memory_limit_bytes = 8 * 2**30
        budget = {"needs": {"kv_bytes": 64 * 2**20}}

    class Limited:
        plan = Plan()

    class Unlimited:
        plan = type("P", (), {"memory_limit_bytes": None})()

    assert prompt_cache_bound(Limited(), 1024) == 64 * 2**20  # type: ignore[arg-type]
    assert prompt_cache_bound(Limited(), 16) == 16 * 2**20  # type: ignore[arg-type]
    assert prompt_cache_bound(Unlimited(), 1024) == 1024 * 2**20  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- the stdio loop


def test_end_of_input_cancels_the_running_chat_and_its_done_still_goes_out() -> None:
    engine = ScriptedEngine(load_tokenizer("qwen3"), [ENDLESS])
    service = EngineService(loader=scripted_loader(engine))
    io = InProcess(service)
    assert isinstance(io.events.next(), HelloEvent)
    io.send({"type": "load", "model_dir": "/scripted"})
    io.events.until(lambda e: isinstance(e, LoadedEvent))
    io.send({"type": "chat", "id": "long", "messages": [{"role": "user", "content": "go"}],
             "sampling": {"max_tokens": 100000}})  # fmt: skip
    io.events.until(lambda e: isinstance(e, TokenTextEvent))  # it is running
    io.close()  # end of input: the loop stops and cancels the running chat
    assert engine.finish_reasons == ["cancelled"]
    rest = [io.events.queue.get_nowait() for _ in range(io.events.queue.qsize())]
    done = [e for e in rest if isinstance(e, DoneEvent)]
    assert len(done) == 1 and done[0].id == "long" and done[0].finish_reason == "cancelled"
    assert engine.closed  # the service was closed with the loop


def test_blank_lines_are_skipped_without_an_answer() -> None:
    io = InProcess(EngineService())
    try:
        assert isinstance(io.events.next(), HelloEvent)
        io.send("\n")
        io.send("   \t \n")
        io.send({"type": "unload"})
        ev = io.events.next()
        assert isinstance(ev, UnloadedEvent), ev  # the blank lines got nothing back, not even an error
    finally:
        io.close()


@pytest.mark.parametrize("value", ["0", "-1"])
def test_a_stats_interval_that_is_not_positive_is_refused_by_name(value: str) -> None:
    from engine.serving import stdio_server

    with pytest.raises(SystemExit, match="--stats-interval must be > 0"):
        stdio_server.main(["--stats-interval", value])


def test_another_rank_follows_rank_0_instead_of_serving_stdio(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.serving import replicated, stdio_server

    followed: list[str] = []
    monkeypatch.setattr(replicated, "service_for_this_rank",
                        lambda: (EngineService(), lambda: followed.append("rank 1") or 7))  # fmt: skip
    monkeypatch.setattr(stdio_server, "_protocol_stdout", lambda: pytest.fail("a follower must not take stdout"))
    assert stdio_server.main(["--stats-interval", "0.5"]) == 7
    assert followed == ["rank 1"]


def test_an_untrimmable_cache_is_snapshotted_and_serves_the_next_turn() -> None:
    tok = load_tokenizer("qwen3")
    engine = _UntrimmableEngine(tok, ["first answer", "second answer"])
    service = _loaded(engine)
    service.prompt_cache = service_module.PromptCache(max_bytes=2**20)
    first = [ChatMessage(role="user", content="a question")]
    done1 = service.chat(ChatRequest(id="t1", messages=first, thinking=False), lambda ev: None, lambda: False)
    assert done1.finish_reason == "stop" and len(service.prompt_cache) >= 1
    second = [*first, ChatMessage(role="assistant", content="first answer"), ChatMessage(role="user", content="more")]
    done2 = service.chat(ChatRequest(id="t2", messages=second, thinking=False), lambda ev: None, lambda: False)
    assert done2.finish_reason == "stop"
    assert done2.figures.reused_tokens > 0  # the snapshot of turn 1 was used
    prompt2 = service_module.render_prompt(tok, second, (), False)
    # only the new tokens were prefilled: up to where the conversation ends (the next snapshot), then the rest
    assert engine.prompts[-2] + engine.prompts[-1] == prompt2[done2.figures.reused_tokens:]
    service.close()


def test_a_cache_that_does_not_hold_the_prompt_is_not_snapshotted(caplog: pytest.LogCaptureFixture) -> None:
    service = EngineService()
    service.prompt_cache = service_module.PromptCache(max_bytes=2**20)
    kv = [_Untrimmable()]
    kv[0].offset = 5
    service._store_snapshot([1, 2, 3], kv)
    assert len(service.prompt_cache) == 0
    assert "cache holds 5 tokens, expected 3" in caplog.text
