"""Prefill progress over the protocol, and Stop in the middle of a prefill (real tiny models).

The service turns the engine's per-layer prefill hook into `prefill` events; a stop polled
between layers ends the turn as "cancelled" and leaves the prompt cache consistent: the next
turn on the same conversation answers exactly as a fresh engine does.
"""

from __future__ import annotations

from typing import Any

import pytest

from engine.serving.protocol import ChatMessage, ChatRequest, DoneEvent, Event, PrefillEvent, TokenTextEvent
from engine.serving.service import EngineService
from engine.types import SamplingParams

# A prompt of about 130 tokens: progress is reported per layer, so a short prompt shows it too.
LONG_TEXT = " ".join(f"item{i} is number {i * 7 % 13}" for i in range(15))


def _request(rid: str, text: str = LONG_TEXT, max_tokens: int = 6) -> ChatRequest:
    return ChatRequest(
        id=rid,
        messages=[ChatMessage(role="user", content=text)],
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


def _load(model_dir: Any, **options: Any) -> EngineService:
    from engine.serving.protocol import LoadRequest
    from engine.types import EngineOptions

    service = EngineService()
    service.load(LoadRequest(model_dir=str(model_dir), options=EngineOptions(cache_mb=0, **options)), lambda ev: None)
    return service


@pytest.fixture
def every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Report every layer (the tiny model's prefill is faster than the 0.25 s throttle)."""
    import engine.serving.service as service_module

    monkeypatch.setattr(service_module, "PREFILL_EVENT_INTERVAL_S", 0.0)


def _answer(events: list[Event], rid: str) -> str:
    return "".join(e.text for e in events if isinstance(e, TokenTextEvent) and e.id == rid)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_a_turn_reports_prefill_progress_before_its_first_token(tiny_model: Any, model_type: str, every_layer: None) -> None:
    service = _load(tiny_model(model_type), prefill_chunk=32)
    try:
        events: list[Event] = []
        done = service.chat(_request("p1"), events.append, lambda: False)
        assert done.finish_reason in ("stop", "length")
        prefill = [e for e in events if isinstance(e, PrefillEvent)]
        assert prefill, "no prefill events"
        assert all(e.id == "p1" for e in prefill)
        first_token = next(i for i, e in enumerate(events) if isinstance(e, TokenTextEvent))
        assert events.index(prefill[-1]) < first_token  # progress comes before the answer
        fractions = [e.fraction for e in prefill]
        assert fractions == sorted(fractions) and fractions[0] < 1.0 and fractions[-1] == pytest.approx(1.0)
        last = prefill[-1]
        assert last.layers_total > 0 and last.tokens_total > 0
        assert last.bytes_read > 0  # cache 0: every routed expert of the prompt was read
        assert done.figures.prompt_tokens >= last.tokens_total
    finally:
        service.close()


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_stop_during_prefill_cancels_and_keeps_the_prompt_cache_consistent(
    tiny_model: Any, model_type: str, every_layer: None
) -> None:
    model = tiny_model(model_type)
    fresh = _load(model, prefill_chunk=32)
    try:
        ref_events: list[Event] = []
        ref = fresh.chat(_request("ref"), ref_events.append, lambda: False)
        reference = _answer(ref_events, "ref")
    finally:
        fresh.close()
    assert ref.finish_reason in ("stop", "length") and reference

    service = _load(model, prefill_chunk=32)
    try:
        seen: list[Event] = []
        stop_now = [False]

        def emit(ev: Event) -> None:
            seen.append(ev)
            if isinstance(ev, PrefillEvent) and ev.layers_done >= 1 and ev.fraction < 1.0:
                stop_now[0] = True  # the user presses Stop while the prompt is being read

        cancelled = service.chat(_request("c1"), emit, lambda: stop_now[0])
        assert isinstance(cancelled, DoneEvent) and cancelled.finish_reason == "cancelled"
        assert not any(isinstance(e, TokenTextEvent) for e in seen)  # stopped before any answer
        assert all(e.fraction < 1.0 for e in seen if isinstance(e, PrefillEvent))
        assert not service.busy

        again: list[Event] = []
        done = service.chat(_request("c2"), again.append, lambda: False)
        assert done.finish_reason == ref.finish_reason
        assert _answer(again, "c2") == reference  # whatever the stopped prefill left is exact
    finally:
        service.close()
