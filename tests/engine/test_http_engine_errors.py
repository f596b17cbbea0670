"""The HTTP server when the engine fails in the middle of a request (before or after tokens went out).

Non-streamed: an OpenAI error body with the status of the failure (500; out of memory too).
Streamed: before the first token, the same error as a status; after tokens, the tokens already sent,
then an ``{"error": ...}`` event, then the end of the stream. Either way the next request is served.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from scripted_engine import ScriptedEngine, load_tokenizer, scripted_loader
from server_harness import ThreadedServer

from engine.serving.http_server import create_app
from engine.serving.protocol import LoadRequest
from engine.serving.service import EngineService
from engine.types import TokenEvent

BODY = {"model": "m", "messages": [{"role": "user", "content": "go"}], "max_tokens": 50}


class FailingEngine(ScriptedEngine):
    """A scripted engine whose first generation raises ``fault`` after ``after`` tokens."""

    def __init__(self, fault: BaseException, after: int) -> None:
        super().__init__(load_tokenizer("qwen3"), ["one two three four five six seven", "fine again"])
        self.fault: BaseException | None = fault
        self.after = after

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[TokenEvent]:
        for n, event in enumerate(super().generate(*args, **kwargs)):
            if n == self.after and self.fault is not None:
                fault, self.fault = self.fault, None
                raise fault
            yield event


class Served:
    def __init__(self, fault: BaseException, after: int) -> None:
        self.engine = FailingEngine(fault, after)
        service = EngineService(loader=scripted_loader(self.engine))
        service.load(LoadRequest(model_dir="/scripted"), lambda ev: None)
        self.server = ThreadedServer(create_app(service, "m", None))

    def post(self, **extra: Any) -> httpx.Response:
        return httpx.post(self.server.url + "/v1/chat/completions", json={**BODY, **extra}, timeout=60)


@pytest.fixture
def served(request: pytest.FixtureRequest) -> Iterator[Served]:
    s = Served(*request.param)
    yield s
    s.server.stop()


def _events(r: httpx.Response) -> list[Any]:
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in r.text.splitlines() if line.startswith("data: ")]


FAULTS = {
    "runtime-error": ((RuntimeError("[metal] command buffer failed"), 3), 500, "internal_error"),
    "out-of-memory": ((MemoryError("std::bad_alloc"), 3), 500, "out_of_memory"),
}


@pytest.mark.parametrize(("served", "status", "code"), FAULTS.values(), ids=list(FAULTS), indirect=["served"])
def test_whole_answer_becomes_an_error_status(served: Served, status: int, code: str) -> None:
    r = served.post()
    assert r.status_code == status
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    again = served.post()
    assert again.status_code == 200 and again.json()["choices"][0]["message"]["content"] == "fine again"


@pytest.mark.parametrize("served", [(RuntimeError("device lost"), 3)], indirect=True)
def test_stream_keeps_the_sent_tokens_then_an_error_event_then_ends(served: Served) -> None:
    r = served.post(stream=True)
    assert r.status_code == 200
    events = _events(r)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if isinstance(e, dict) and "choices" in e)
    assert text.split()[:2] == ["one", "two"] and "four" not in text  # what went out before the failure
    errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
    assert len(errors) == 1 and errors[0]["code"] == "internal_error" and "device lost" in errors[0]["message"]
    assert events.index({"error": errors[0]}) > 0  # after the tokens
    assert served.post(stream=True).status_code == 200  # served again


@pytest.mark.parametrize("served", [(RuntimeError("failed at once"), 0)], indirect=True)
def test_stream_failing_before_any_token_answers_with_a_status(served: Served) -> None:
    r = served.post(stream=True)
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["error"]["code"] == "internal_error" and "failed at once" in r.json()["error"]["message"]
