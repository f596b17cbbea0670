"""Engine faults over the stdio protocol: memory running out in the middle of an answer.

The tokens made before the failure reach the app, then an `error` with code out_of_memory,
usable false and the chat's id, then the chat's `done` with finish_reason "error": the app
keeps the partial answer and replaces the engine (tests/app/test_engine_faults_app.py).
Other failures stay usable: the engine serves the next request.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from scripted_engine import ScriptedEngine, load_tokenizer, scripted_loader
from stdio_harness import InProcess

from engine.serving.protocol import DoneEvent, ErrorEvent, HelloEvent, LoadedEvent, StatsEvent, TokenTextEvent
from engine.serving.service import EngineService, error_event
from engine.types import TokenEvent


class FailingEngine(ScriptedEngine):
    """A scripted engine whose first generation raises `fault` after `after` tokens."""

    def __init__(self, fault: BaseException, after: int) -> None:
        super().__init__(load_tokenizer("qwen3"), ["one two three four five six seven", "fine again"])
        self.fault: BaseException | None = fault
        self.after = after

    def generate(self, prompt_tokens: Sequence[int], sampling: Any, stop: Any = None, kv_cache: Any = None,
                 reused_tokens: int = 0, **kwargs: Any) -> Iterator[TokenEvent]:  # fmt: skip
        for n, event in enumerate(super().generate(prompt_tokens, sampling, stop, kv_cache, reused_tokens, **kwargs)):
            if n == self.after and self.fault is not None:
                fault, self.fault = self.fault, None
                raise fault
            yield event


def chat_events(io: InProcess, rid: str) -> list[Any]:
    """Send a chat and collect its events up to its `done`, less the periodic `stats` events."""
    io.send({"type": "chat", "id": rid, "messages": [{"role": "user", "content": "go"}], "thinking": False})
    events = io.events.until(lambda e: isinstance(e, DoneEvent) and e.id == rid, timeout=60)
    return [e for e in events if not isinstance(e, StatsEvent)]


@pytest.mark.parametrize(
    ("fault", "code", "usable", "text"),
    [
        (MemoryError("std::bad_alloc"), "out_of_memory", False, "out of memory (MemoryError: std::bad_alloc)"),
        (RuntimeError("[metal] command buffer failed"), "internal_error", True, "RuntimeError: [metal] command buffer"),
        # Metal's own exhaustion arrives as a RuntimeError (mlx/backend/metal/eval.cpp): restarted as for MemoryError
        (RuntimeError("[METAL] Command buffer execution failed: Insufficient Memory "
                      "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"),
         "out_of_memory", False, "smaller expert cache"),
    ],
    ids=["memory-error", "other-error", "metal-out-of-memory"],
)
def test_failure_mid_answer_keeps_the_tokens_and_says_whether_the_engine_can_go_on(
    fault: BaseException, code: str, usable: bool, text: str
) -> None:
    io = InProcess(EngineService(loader=scripted_loader(FailingEngine(fault, after=3))))
    try:
        assert isinstance(io.events.next(), HelloEvent)
        io.send({"type": "load", "model_dir": "/scripted"})
        io.events.until(lambda e: isinstance(e, LoadedEvent))
        events = chat_events(io, "c1")
        assert [type(e) for e in events[-2:]] == [ErrorEvent, DoneEvent], events
        tokens = "".join(e.text for e in events if isinstance(e, TokenTextEvent))
        assert tokens.split()[:2] == ["one", "two"] and "four" not in tokens, tokens  # sent before the failure
        error = events[-2]
        assert (error.code, error.usable, error.id) == (code, usable, "c1") and text in error.message
        assert events[-1].finish_reason == "error"
        later = chat_events(io, "c2")  # the loop itself goes on (the app replaces an unusable engine)
        assert later[-1].finish_reason == "stop"
        assert "".join(e.text for e in later if isinstance(e, TokenTextEvent)) == "fine again"
    finally:
        io.close()


def test_error_event_marks_only_memory_exhaustion_unusable() -> None:
    assert error_event(MemoryError(), "r").usable is False
    assert error_event(MemoryError(), "r").code == "out_of_memory"
    assert error_event(OSError(5, "I/O error"), "r").usable is True
    assert error_event(ValueError("x")).code == "internal_error"
