"""Fuzzing the protocol, the stdio line handler, the tool-call parser and the OpenAI request parser.

Every input ends in a value or a clean rejection (ProtocolError, ToolCallParseError, APIError),
never another exception. CI runs 8,500 cases here (with tests/app/test_tools_fuzz.py over 10,000;
tests/test_fuzz_budget.py checks the sum); the `slow` variants run 50,000 more here.
"""

from __future__ import annotations

import io
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mlx_lm.tool_parsers import json_tools, qwen3_coder

from engine.serving.chat import ChatFormat, OutputSplitter, ToolCallParseError, parse_tool_text
from engine.serving.openai_format import APIError, parse_completion_request
from engine.serving.protocol import (
    REQUEST_TYPES,
    ErrorEvent,
    ProtocolError,
    ToolCallEvent,
    TokenTextEvent,
    decode_event,
    decode_request,
    encode,
)
from engine.serving.service import EngineService
from engine.serving.stdio_server import StdioServer

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
LONG = settings(FUZZ, max_examples=10000)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(
    json_scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids, max_size=4),
    max_leaves=20,
)
FIELDS = ["v", "type", "id", "model_dir", "options", "messages", "tools", "sampling", "thinking", "role", "content",
          "tool_calls", "max_tokens", "temperature", "cache_mb", "prompt_cache_mb", "name", "arguments"]  # fmt: skip


@st.composite
def request_objects(draw: Any) -> dict[str, Any]:
    """Objects that look like requests: right version and a real type most of the time."""
    obj: dict[str, Any] = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
    obj["v"] = draw(st.sampled_from([1, 1, 1, 2, "1", True, None]))
    obj["type"] = draw(st.sampled_from([*REQUEST_TYPES, "token", "", 5]))
    if draw(st.booleans()):
        obj["messages"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"role": st.sampled_from(["user", "assistant", "tool", "system", "x", 1])},
                    optional={"content": json_values, "tool_calls": json_values, "tool_call_id": json_values},
                ),
                max_size=3,
            )
        )
        obj["id"] = draw(st.text(max_size=5) | json_values)
    return obj


def _decode_or_reject(line: str) -> None:
    try:
        req = decode_request(line)
    except ProtocolError as exc:
        assert str(exc)
        return
    assert decode_request(encode(req)) == req  # whatever is accepted survives a round trip


@settings(FUZZ, max_examples=2000)
@given(st.text(max_size=200))
def test_arbitrary_text_lines(text: str) -> None:
    _decode_or_reject(text)


@settings(FUZZ, max_examples=1200)
@given(request_objects())
def test_request_shaped_objects(obj: dict[str, Any]) -> None:
    _decode_or_reject(json.dumps(obj))


class _Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def write(self, text: str) -> int:
        self.lines.append(text)
        return len(text)

    def flush(self) -> None:
        pass


@settings(FUZZ, max_examples=1300)
@given(st.text(max_size=120) | request_objects().map(json.dumps))
def test_stdio_line_handler_never_raises(line: str) -> None:
    out = _Lines()
    server = StdioServer(EngineService(), io.StringIO(), out)  # type: ignore[arg-type]
    keep_going = server._handle_line(line + "\n")
    assert isinstance(keep_going, bool)
    for text in out.lines:
        ev = decode_event(text)
        assert isinstance(ev, ErrorEvent) and ev.usable


QWEN3 = ChatFormat("<think>", "</think>", "<tool_call>", "</tool_call>", json_tools.parse_tool_call)
QWEN3_5 = ChatFormat("<think>", "</think>", "<tool_call>", "</tool_call>", qwen3_coder.parse_tool_call)
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
    "a": {"type": "integer"}, "b": {"type": "number"}, "c": {"type": "boolean"}, "d": {"type": "object"},
    "e": {"type": "string"}}}}}]  # fmt: skip
PIECES = ["<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_", "call>", "</", "<", ">", "{", "}", "[", "]",
          '"name"', '"arguments"', ":", ", ", '"f"', "1e999", "NaN", "\n", " ", "x", "é", "<function=f>", "</function>",
          "<parameter=a>", "<parameter=b>", "<parameter=d>", "</parameter>", "null", "true", "-0.5", "(1,", ")",
          '"\\ud800"', "\ud800"]  # fmt: skip
model_text = st.lists(st.sampled_from(PIECES) | st.text(max_size=4), max_size=40).map("".join)


def _run(fmt: ChatFormat, chunks: list[str]) -> OutputSplitter:
    sp = OutputSplitter(fmt, TOOLS)
    pieces = [p for c in chunks for p in sp.feed(c)] + sp.finish()
    for p in pieces:
        if p.kind in ("answer", "reasoning"):
            encode(TokenTextEvent(id="r", text=p.text, kind=p.kind))  # type: ignore[arg-type]
            for marker in ("<tool_call>", "</tool_call>", "<think>", "</think>"):
                assert marker not in p.text
        elif p.kind == "tool_call":
            assert p.call is not None and p.call.name and p.call.id
            encode(ToolCallEvent(id="r", call_id=p.call.id, name=p.call.name, arguments=p.call.arguments))
    return sp


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from([QWEN3, QWEN3_5]), model_text, st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_model_output_splitting_never_crashes_or_leaks_markup(fmt: ChatFormat, text: str, sizes: list[int]) -> None:
    whole = _run(fmt, [text])
    chunks, i = [], 0
    while i < len(text):
        n = sizes[len(chunks) % len(sizes)]
        chunks.append(text[i : i + n])
        i += n
    split = _run(fmt, chunks)
    assert (split.answer, split.reasoning) == (whole.answer, whole.reasoning)  # chunking never changes the result
    assert [(c.name, c.arguments) for c in split.tool_calls] == [(c.name, c.arguments) for c in whole.tool_calls]


@settings(FUZZ, max_examples=1500)
@given(st.sampled_from([QWEN3, QWEN3_5]), model_text | st.text(max_size=80))
def test_tool_call_parser_returns_calls_or_rejects(fmt: ChatFormat, text: str) -> None:
    try:
        calls = parse_tool_text(text, fmt, TOOLS)
    except ToolCallParseError as exc:
        assert str(exc)
        return
    for c in calls:
        assert isinstance(c.arguments, dict)
        json.dumps(c.arguments, allow_nan=False)


@settings(FUZZ, max_examples=1000)
@given(json_values | st.dictionaries(st.sampled_from(["messages", "model", "tools", "max_tokens", "temperature", "top_p", "stream",
       "stream_options", "n", "stop", "seed", "tool_choice", "chat_template_kwargs"]), json_values))  # fmt: skip
def test_openai_bodies_parse_or_give_400(body: Any) -> None:
    try:
        parsed = parse_completion_request(body)
    except APIError as exc:
        assert exc.status == 400 and exc.message
        return
    assert parsed.chat.messages


@pytest.mark.slow
@LONG
@given(st.sampled_from([QWEN3, QWEN3_5]), model_text, st.lists(st.integers(1, 7), min_size=1, max_size=10))
def test_model_output_splitting_long(fmt: ChatFormat, text: str, sizes: list[int]) -> None:
    test_model_output_splitting_never_crashes_or_leaks_markup.hypothesis.inner_test(fmt, text, sizes)  # type: ignore[attr-defined]


@pytest.mark.slow
@LONG
@given(st.text(max_size=400) | request_objects().map(json.dumps))
def test_request_lines_long(line: str) -> None:
    _decode_or_reject(line)


@pytest.mark.slow
@LONG
@given(st.sampled_from([QWEN3, QWEN3_5]), model_text | st.text(max_size=80))
def test_tool_call_parser_long(fmt: ChatFormat, text: str) -> None:
    test_tool_call_parser_returns_calls_or_rejects.hypothesis.inner_test(fmt, text)  # type: ignore[attr-defined]


@pytest.mark.slow
@LONG
@given(st.text(max_size=120) | request_objects().map(json.dumps))
def test_stdio_line_handler_long(line: str) -> None:
    test_stdio_line_handler_never_raises.hypothesis.inner_test(line)  # type: ignore[attr-defined]


@pytest.mark.slow
@LONG
@given(json_values | st.dictionaries(st.sampled_from(["messages", "model", "tools", "max_tokens", "temperature", "top_p", "stream",
       "stream_options", "n", "stop", "seed", "tool_choice", "chat_template_kwargs"]), json_values))  # fmt: skip
def test_openai_bodies_long(body: Any) -> None:
    test_openai_bodies_parse_or_give_400.hypothesis.inner_test(body)  # type: ignore[attr-defined]
