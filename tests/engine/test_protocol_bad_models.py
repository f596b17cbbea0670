"""Bad model files over the stdio protocol: a named error event, and the engine serves on.

One real engine process (`python -m engine.serving.stdio_server`) takes every damaged model in turn. A
`load` of a damaged model answers with one `error` event (id null, usable) whose one-line
message names the file or field at fault; a damaged packed expert shows at the first `chat` as an
error with the chat's id and a `done` with finish_reason "error". After each, the same process
loads a good model and answers a chat.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from bad_models import BAD_MODELS, BadModel, copy_model
from stdio_harness import Subprocess

from engine.serving.protocol import DoneEvent, ErrorEvent, Event, HelloEvent, LoadedEvent, StatsEvent, TokenTextEvent

LOAD_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def engine() -> Iterator[Subprocess]:
    """One engine process for the whole module (a failed load must not spoil it)."""
    server = Subprocess()
    try:
        assert isinstance(server.events.next(timeout=120), HelloEvent)
        yield server
        assert not server.events.bad_lines, server.events.bad_lines[:3]
        assert server.close() == 0, "".join(server.stderr[-20:])
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="module")
def good_model(tiny_model: Any) -> Path:
    """A sharded tiny model (the damage needs several weight files)."""
    return tiny_model("qwen3_moe", 4, max_shard_bytes=4 * 2**20)


def load(engine: Subprocess, model: Path) -> Event:
    """Send `load` and return the event that ends it (loaded or error)."""
    engine.send({"type": "load", "model_dir": str(model)})
    return engine.events.until(lambda e: isinstance(e, (LoadedEvent, ErrorEvent)), timeout=LOAD_TIMEOUT_S)[-1]


def chat(engine: Subprocess, rid: str, max_tokens: int = 4) -> list[Event]:
    """Send a short chat and return its events up to its `done`, less the periodic `stats` events."""
    engine.send({"type": "chat", "id": rid, "messages": [{"role": "user", "content": "Hello"}],
                 "sampling": {"max_tokens": max_tokens}, "thinking": False})  # fmt: skip
    events = engine.events.until(lambda e: isinstance(e, DoneEvent) and e.id == rid, timeout=LOAD_TIMEOUT_S)
    return [e for e in events if not isinstance(e, StatsEvent)]


def assert_named(event: Event, code: str, needles: tuple[str, ...], request_id: str | None) -> None:
    """An error event with this code and id, usable, whose one-line message holds every needle."""
    assert isinstance(event, ErrorEvent), event
    assert (event.code, event.id, event.usable) == (code, request_id, True), event
    assert "\n" not in event.message and len(event.message) < 1000, event.message
    for needle in needles:
        assert needle in event.message, f"{needle!r} not in {event.message!r}"


@pytest.mark.parametrize("bad", BAD_MODELS, ids=[b.id for b in BAD_MODELS])
def test_bad_model_gives_a_named_error_and_the_engine_serves_on(
    engine: Subprocess, good_model: Path, tmp_path: Path, bad: BadModel
) -> None:
    model = copy_model(good_model, tmp_path / "model")
    needles = (*bad.damage(model), str(model))
    ended = load(engine, model)
    if bad.at == "load":
        assert_named(ended, bad.code, needles, None)
        refused = chat(engine, "after-failed-load")  # the failed load left no model behind
        assert_named(refused[0], "not_loaded", (), "after-failed-load")
    else:
        assert isinstance(ended, LoadedEvent), ended
        for rid in ("reads-damage", "reads-damage-again"):  # a chat fails cleanly, again and again
            events = chat(engine, rid)
            errors = [e for e in events if isinstance(e, ErrorEvent)]
            assert len(errors) == 1, events
            assert_named(errors[0], bad.code, needles, rid)
            assert events[-1].finish_reason == "error"  # type: ignore[union-attr]

    loaded = load(engine, good_model)
    assert isinstance(loaded, LoadedEvent) and loaded.model_dir == str(good_model), loaded
    events = chat(engine, "good")
    assert not [e for e in events if isinstance(e, ErrorEvent)], events
    assert events[-1].finish_reason == "length"  # type: ignore[union-attr]
    assert any(isinstance(e, TokenTextEvent) for e in events)
