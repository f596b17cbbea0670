"""Prompt-cache reuse across real chat turns on tiny models: KV (trimmed) and linear-attention
(snapshot) caches; the reused answer always equals a cold run of the same conversation."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from engine.serving.chat import render_prompt
from engine.model.prompt_cache import common_prefix_len
from engine.serving.protocol import ChatMessage, ChatRequest, DoneEvent, Event, LoadRequest, TokenTextEvent
from engine.serving.service import EngineService
from engine.types import SamplingParams

MODELS = ["qwen3_moe", "qwen3_next", "qwen3_5_moe"]
TRIMMABLE = {"qwen3_moe": True, "qwen3_next": False, "qwen3_5_moe": False}
_ids = itertools.count()


@pytest.fixture(scope="module", params=MODELS)
def service(request: pytest.FixtureRequest, tiny_model: Any) -> Any:
    svc = EngineService()
    svc.load(LoadRequest(model_dir=str(tiny_model(request.param))), lambda ev: None)
    svc.model_type = request.param  # type: ignore[attr-defined]
    yield svc
    svc.close()


def run(svc: EngineService, messages: list[ChatMessage], thinking: bool | None) -> tuple[str, DoneEvent]:
    events: list[Event] = []
    req = ChatRequest(id=f"r{next(_ids)}", messages=messages, sampling=SamplingParams(max_tokens=8), thinking=thinking)
    done = svc.chat(req, events.append, lambda: False)
    text = "".join(e.text for e in events if isinstance(e, TokenTextEvent))
    return text, done


def prompt(svc: EngineService, messages: list[ChatMessage], thinking: bool | None, gen: bool = True) -> list[int]:
    assert svc.engine is not None
    return render_prompt(svc.engine.tokenizer, messages, (), thinking, add_generation_prompt=gen)


def two_turns(svc: EngineService, thinking: bool | None) -> tuple[list[ChatMessage], list[ChatMessage], str, DoneEvent]:
    svc.prompt_cache.clear()
    first = [ChatMessage(role="user", content="Tell me about the sea.")]
    answer, done1 = run(svc, first, thinking)
    assert done1.figures.reused_tokens == 0
    second = [*first, ChatMessage(role="assistant", content=answer), ChatMessage(role="user", content="More?")]
    text2, done2 = run(svc, second, thinking)
    svc.prompt_cache.clear()
    cold_text, cold = run(svc, second, thinking)
    assert cold.figures.reused_tokens == 0
    assert (text2, done2.figures.generated_tokens) == (cold_text, cold.figures.generated_tokens)
    return first, second, text2, done2


def test_template_that_rewrites_the_generation_prompt(service: EngineService) -> None:
    """thinking=False: the prompt ends in an empty <think> block that history does not keep."""
    first, second, _, done2 = two_turns(service, thinking=False)
    p1, p2 = prompt(service, first, False), prompt(service, second, False)
    b1 = prompt(service, first, False, gen=False)
    common = common_prefix_len(p1, p2)
    assert len(b1) < common < len(p1)  # turn 1's prompt is not a prefix of turn 2's
    expected = common if TRIMMABLE[service.model_type] else len(b1)  # type: ignore[attr-defined]
    assert done2.figures.reused_tokens == expected
    assert done2.figures.prompt_tokens == len(p2) - expected


def test_template_that_keeps_the_prompt(service: EngineService) -> None:
    """thinking on (template default): turn 1's whole prompt is a prefix of turn 2's."""
    first, second, _, done2 = two_turns(service, thinking=None)
    p1, p2 = prompt(service, first, None), prompt(service, second, None)
    assert p2[: len(p1)] == p1
    assert len(p1) <= done2.figures.reused_tokens < len(p2)


def test_regenerate_reuses_and_repeats(service: EngineService) -> None:
    """The same turn again (the app's Regenerate): a linear-attention model restarts from the
    snapshot at the end of the previous turn's prompt, a KV model from all but one token."""
    service.prompt_cache.clear()
    first = [ChatMessage(role="user", content="Name a fish.")]
    answer, _ = run(service, first, None)
    second = [*first, ChatMessage(role="assistant", content=answer), ChatMessage(role="user", content="Another.")]
    text2, _ = run(service, second, None)
    text, done = run(service, second, None)
    p1, p2 = prompt(service, first, None), prompt(service, second, None)
    expected = len(p2) - 1 if TRIMMABLE[service.model_type] else len(p1)  # type: ignore[attr-defined]
    assert done.figures.reused_tokens == expected
    assert text == text2


def test_cache_stays_within_its_byte_bound(service: EngineService) -> None:
    limit = service.prompt_cache.max_bytes
    try:
        service.prompt_cache.max_bytes = 1024  # smaller than any state of this model
        service.prompt_cache.clear()
        msgs = [ChatMessage(role="user", content="hi")]
        run(service, msgs, None)
        _, done = run(service, msgs, None)
        assert done.figures.reused_tokens == 0 and len(service.prompt_cache) == 0
    finally:
        service.prompt_cache.max_bytes = limit
    two_turns(service, thinking=None)
    assert 0 < service.prompt_cache.nbytes <= limit
