"""The generation loop's refusals and its stop during decoding (engine/model/generate.py).

A stop between decoded tokens ends with the cancelled event and loses nothing: the KV cache holds
exactly the prompt and the tokens fed back so far (a step queued ahead is taken out again), so the
answer resumed on that cache is mlx-lm's. Requests that cannot run are refused before anything
is read, naming the figure that is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.engine import Engine
from engine.errors import RequestError
from engine.model.generate import NO_TOKEN, generate_tokens
from engine.types import EngineOptions, SamplingParams
from exactness import cache_mb, long_prompt, mlx_lm_reference, share_tokenizers

PROMPT = 40
N_TOKENS = 12


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    share_tokenizers(monkeypatch)


@pytest.mark.parametrize("size", ["all", "partial"])  # device-routed (steps queued ahead) and host-synced
def test_stop_while_decoding_keeps_the_cache_and_the_resumed_answer_is_exact(tiny_model, size: str) -> None:
    path = tiny_model("qwen3_5_moe", 4)
    prompt = long_prompt(PROMPT)
    expected = mlx_lm_reference(path, prompt, N_TOKENS)
    assert len(expected) == N_TOKENS
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, size)), measure_disk=False)
    try:
        if size == "all":
            engine.preload_experts()
        cache = engine.make_kv_cache()
        got: list[int] = []
        events = []
        for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS), stop=lambda: len(got) >= 5, kv_cache=cache):
            events.append(ev)
            if ev.token != NO_TOKEN:
                got.append(ev.token)
        assert events[-1].token == NO_TOKEN and events[-1].finish_reason == "cancelled"
        assert got == expected[:5]
        fed = len(prompt) + len(got) - 1  # the last token is not fed back yet
        offsets = [c.offset for c in cache if hasattr(c, "offset") and c.is_trimmable()]
        assert offsets and all(o == fed for o in offsets), offsets
        if size == "all":
            assert engine.expert_counters()["device_routed_calls"] > 0  # steps were queued ahead
        rest = [ev.token for ev in engine.generate([got[-1]], SamplingParams(max_tokens=N_TOKENS - len(got)),
                                                   kv_cache=cache, reused_tokens=fed)]  # fmt: skip
        assert got + rest == expected
    finally:
        engine.close()


def _refused(engine: Engine, prompt: list[int], sampling: SamplingParams, **kwargs: Any) -> str:
    reads = engine._loaded.store.reads
    with pytest.raises(RequestError) as refused:
        next(iter(generate_tokens(engine.model, engine._loaded.streamer, engine.make_kv_cache(), prompt, sampling,
                                  eos_token_ids=set(), **kwargs)))  # fmt: skip
    assert engine._loaded.store.reads == reads  # nothing read
    return str(refused.value)


def test_requests_that_cannot_run_are_refused_before_any_read(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        one = SamplingParams(max_tokens=1)
        assert _refused(engine, [], one) == "the prompt has no new tokens to process"
        assert _refused(engine, [5, 6, 7], SamplingParams(max_tokens=0)) == "max_tokens must be at least 1, got 0"
        message = _refused(engine, [5, 6, 7], one, reused_tokens=61, context_length=64)
        assert message.startswith("the prompt has 64 tokens (61 reused); the model's context is 64 tokens")
        # one token short of the context is served
        events = list(generate_tokens(engine.model, engine._loaded.streamer, engine.make_kv_cache(), [5, 6, 7], one,
                                      eos_token_ids=set(), context_length=4))  # fmt: skip
        assert len(events) == 1 and events[0].finish_reason == "length"
    finally:
        engine.close()
