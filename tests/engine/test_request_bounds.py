"""Requests cannot poison others or run unbounded: sampling parameters checked against the model
(400 naming the field), each request's random state its own, and the model's context bounding
every request (a prompt that does not fit is refused naming both numbers; prompt plus max_tokens
beyond the context stops at the context with finish_reason "length").

A real tiny model behind the real HTTP server (the app's stdio engine runs the same EngineService,
checked directly at the end).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from server_harness import ThreadedServer

from engine.serving import service as service_module
from engine.serving.http_server import create_app
from engine.serving.protocol import ChatMessage, ChatRequest, LoadRequest, ProtocolError
from engine.serving.service import EngineService
from engine.types import SamplingParams

CONTEXT = 64  # the tiny model's max_position_embeddings
MESSAGES = [{"role": "user", "content": "Say something."}]


class Served:
    def __init__(self, model_dir: Path) -> None:
        self.service = EngineService()
        self.service.load(LoadRequest(model_dir=str(model_dir)), lambda ev: None)
        self.vocab = int(json.loads((model_dir / "config.json").read_text())["vocab_size"])
        self.server = ThreadedServer(create_app(self.service, "tiny", None))

    def post(self, **body: Any) -> httpx.Response:
        return httpx.post(self.server.url + "/v1/chat/completions", json={"messages": MESSAGES, **body}, timeout=120)

    def answer(self, **body: Any) -> dict[str, Any]:
        r = self.post(**body)
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def text(self, **body: Any) -> str:
        return str(self.answer(**body)["choices"][0]["message"]["content"])


@pytest.fixture(scope="module")
def served(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    # The session's shared tiny model (no second build) with a 64-token context in its config.
    model = tmp_path_factory.mktemp("bounded") / "tiny"
    shutil.copytree(tiny_model("qwen3_moe"), model)
    config = json.loads((model / "config.json").read_text())
    config["max_position_embeddings"] = CONTEXT
    (model / "config.json").write_text(json.dumps(config))
    s = Served(model)
    yield s
    s.server.stop()
    s.service.close()


def _error(r: httpx.Response, status: int = 400) -> dict[str, Any]:
    assert r.status_code == status, r.text
    return r.json()["error"]  # type: ignore[no-any-return]


def test_top_k_is_checked_against_the_vocabulary(served: Served) -> None:
    error = _error(served.post(top_k=served.vocab + 1, temperature=1.0, max_tokens=4))
    assert "top_k" in error["message"] and str(served.vocab) in error["message"] and error["param"].endswith("top_k")
    sampled = {"temperature": 1.0, "seed": 5, "max_tokens": 6}
    assert served.text(top_k=served.vocab, **sampled) == served.text(top_k=0, **sampled)  # all tokens kept: no top-k


def test_logit_bias_ids_are_checked_and_the_bias_applies(served: Served) -> None:
    error = _error(served.post(logit_bias={str(served.vocab): 5}, max_tokens=2))
    assert "logit_bias" in error["message"] and str(served.vocab) in error["message"]
    for bad in ({"-3": 1}, {"x": 1}, {"\u00b2": 1}, {"\u0663": 1}, {"7": 101}, {"7": "high"}, ["7"]):
        assert "logit_bias" in _error(served.post(logit_bias=bad, max_tokens=2))["message"], bad
    token = 1000
    tokenizer = served.service.engine.tokenizer  # type: ignore[union-attr]
    forced = served.answer(logit_bias={str(token): 100}, temperature=0, max_tokens=5)
    assert forced["choices"][0]["message"]["content"] == tokenizer.decode([token] * 5)


@pytest.mark.parametrize("field", ["temperature", "top_p", "min_p", "repetition_penalty"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_sampling_numbers_must_be_finite(served: Served, field: str, value: str) -> None:
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2})[:-1] + f', "{field}": {value}}}'
    r = httpx.post(served.server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert field in _error(r)["message"]


def test_the_protocol_refuses_non_finite_sampling_numbers() -> None:
    for field in ("temperature", "top_p", "min_p", "repetition_penalty"):
        sampling = SamplingParams(**{field: float("nan")})  # type: ignore[arg-type]
        with pytest.raises(ProtocolError, match=f"chat.sampling.{field}"):
            ChatRequest(id="r", messages=[ChatMessage(role="user", content="x")], sampling=sampling).check()


def test_a_failing_request_does_not_change_the_next_ones(served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    """The old failure: top_k past the vocabulary made the sampler fail inside MLX, and every unseeded
    request after it failed too. The check is lifted here so the request reaches the sampler."""
    sampled = {"temperature": 1.0, "max_tokens": 8}
    before = served.text(seed=11, **sampled)
    served.text(**sampled)  # an unseeded request in between does not change a seeded one either
    assert served.text(seed=11, **sampled) == before
    unchecked = service_module.bounded_sampling
    monkeypatch.setattr(service_module, "bounded_sampling", lambda sampling, vocab, *rest: unchecked(sampling, 0, *rest))
    failed = served.post(top_k=served.vocab * 4, **sampled)
    assert failed.status_code == 500, failed.text
    monkeypatch.setattr(service_module, "bounded_sampling", unchecked)
    for _ in range(2):
        assert served.text(**sampled)  # unseeded sampling works after the failure
        assert served.text(seed=11, **sampled) == before  # and seeded results are as before it


def test_a_prompt_longer_than_the_context_is_refused_naming_both_numbers(served: Served) -> None:
    long = [{"role": "user", "content": "word " * 200}]
    r = httpx.post(served.server.url + "/v1/chat/completions", json={"messages": long, "max_tokens": 4}, timeout=60)
    message = _error(r)["message"]
    assert str(CONTEXT) in message and "tokens" in message


def test_prompt_plus_max_tokens_past_the_context_stops_at_the_context(served: Served) -> None:
    answer = served.answer(max_tokens=10_000, temperature=0)
    usage = answer["usage"]
    assert answer["choices"][0]["finish_reason"] == "length"
    assert usage["prompt_tokens"] + usage["completion_tokens"] == CONTEXT
    short = served.answer(max_tokens=3, temperature=0)
    assert short["usage"]["completion_tokens"] == 3 and short["choices"][0]["finish_reason"] == "length"


def test_the_app_path_is_bounded_the_same_way(served: Served) -> None:
    """The stdio engine (the app's) runs EngineService.chat: the same stop at the context."""
    events: list[Any] = []
    request = ChatRequest(id="app-1", messages=[ChatMessage(role="user", content="Say something.")],
                          sampling=SamplingParams(max_tokens=1 << 20))
    done = served.service.chat(request, events.append, lambda: False)
    assert done.finish_reason == "length"
    assert done.figures.prompt_tokens + done.figures.reused_tokens + done.figures.generated_tokens == CONTEXT
    with pytest.raises(ProtocolError, match="top_k"):
        served.service.chat(ChatRequest(id="app-2", messages=request.messages,
                                        sampling=SamplingParams(top_k=served.vocab + 1)), events.append, lambda: False)


def test_logit_bias_crosses_the_stdio_protocol_and_bad_ids_are_named() -> None:
    from engine.serving import protocol

    request = ChatRequest(id="r", messages=[ChatMessage(role="user", content="x")],
                          sampling=SamplingParams(logit_bias={5: 1.5, 7: -100.0}))
    decoded = protocol.decode_request(protocol.encode(request))
    assert isinstance(decoded, ChatRequest) and decoded.sampling.logit_bias == {5: 1.5, 7: -100.0}
    for bad in ('{"-1": 1}', '{"x": 1}', '{"\\u00b2": 1}', '{"5": 1000}'):
        line = protocol.encode(request).replace('{"5": 1.5, "7": -100.0}', bad)
        assert bad in line
        with pytest.raises(ProtocolError, match="chat.sampling.logit_bias"):
            protocol.decode_request(line)


@pytest.mark.parametrize("field", ["top_k", "max_tokens", "seed", "temperature"])
def test_a_huge_integer_is_a_400_naming_the_field(served: Served, field: str) -> None:
    body = json.dumps({"messages": MESSAGES})[:-1] + f', "{field}": 1{"0" * 400}}}'
    r = httpx.post(served.server.url + "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert field in _error(r)["message"]
