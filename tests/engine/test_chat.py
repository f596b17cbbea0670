"""Chat formatting: templates through mlx-lm's tokenizer wrapper, <think> split, tool-call parsing."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from mlx_lm.tool_parsers import json_tools, qwen3_coder

from engine.serving.chat import (
    ChatFormat,
    OutputSplitter,
    Piece,
    ToolCallParseError,
    parse_tool_text,
    prompt_ends_in_reasoning,
    render_prompt,
    template_messages,
)
from engine.errors import RequestError
from engine.serving.protocol import ChatMessage, ToolCall

QWEN3 = ChatFormat("<think>", "</think>", "<tool_call>", "</tool_call>", json_tools.parse_tool_call)
QWEN3_5 = ChatFormat("<think>", "</think>", "<tool_call>", "</tool_call>", qwen3_coder.parse_tool_call)
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


def split(fmt: ChatFormat, chunks: Iterable[str], in_reasoning: bool = False) -> tuple[list[Piece], OutputSplitter]:
    sp = OutputSplitter(fmt, [WEATHER], in_reasoning=in_reasoning)
    pieces: list[Piece] = []
    for chunk in chunks:
        pieces += sp.feed(chunk)
    pieces += sp.finish()
    return pieces, sp


def texts(pieces: list[Piece], kind: str) -> str:
    return "".join(p.text for p in pieces if p.kind == kind)


@pytest.fixture(scope="module")
def tokenizers() -> dict[str, object]:
    from mlx_lm.tokenizer_utils import load

    from engine.demo.tokenizer_builder import cached_tokenizer_dir

    return {kind: load(Path(cached_tokenizer_dir(kind))) for kind in ("qwen3", "qwen3_5")}


QWEN3_OUT = (
    "<think>\nThe user wants weather.\n</think>\n\nLet me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>'
)
QWEN3_5_OUT = (
    "<think>\nweather needed\n</think>\n\n<tool_call>\n<function=get_weather>\n"
    "<parameter=city>\nOslo\n</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
)


@pytest.mark.parametrize(("fmt", "out"), [(QWEN3, QWEN3_OUT), (QWEN3_5, QWEN3_5_OUT)], ids=["qwen3", "qwen3_5"])
@pytest.mark.parametrize("chunking", ["whole", "chars", "threes"])
def test_tool_call_text_becomes_tool_calls(fmt: ChatFormat, out: str, chunking: str) -> None:
    size = {"whole": len(out), "chars": 1, "threes": 3}[chunking]
    pieces, sp = split(fmt, [out[i : i + size] for i in range(0, len(out), size)])
    calls = [p.call for p in pieces if p.kind == "tool_call"]
    assert len(calls) == 1 and calls[0] is not None
    assert calls[0].name == "get_weather"
    assert calls[0].arguments == {"city": "Oslo", "days": 2}
    assert calls[0].id.startswith("call_") and len(calls[0].id) > 8
    answer = texts(pieces, "answer")
    assert "<" not in answer and "tool_call" not in answer and "function" not in answer
    assert texts(pieces, "reasoning") in ("The user wants weather.", "weather needed")
    assert sp.tool_calls == calls


def test_reasoning_and_answer_split_with_template_whitespace_dropped() -> None:
    pieces, sp = split(QWEN3, ["<think>", "\n", "a", " b", "\n", "</think>", "\n\n", "Hello", " ", "world", "\n"])
    assert texts(pieces, "reasoning") == "a b"
    assert texts(pieces, "answer") == "Hello world"
    assert sp.answer == "Hello world" and sp.reasoning == "a b"


def test_prompt_that_opened_think_starts_in_reasoning() -> None:
    pieces, _ = split(QWEN3, ["plan", "</think>", "done"], in_reasoning=True)
    assert [(p.kind, p.text) for p in pieces] == [("reasoning", "plan"), ("answer", "done")]


def test_two_calls_get_distinct_ids() -> None:
    one = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>'
    two = '<tool_call>\n{"name": "get_weather", "arguments": "{\\"city\\": \\"B\\"}"}\n</tool_call>'
    pieces, _ = split(QWEN3, [one, "\n", two])
    calls = [p.call for p in pieces if p.call]
    assert [c.arguments["city"] for c in calls] == ["A", "B"]
    assert len({c.id for c in calls}) == 2
    assert texts(pieces, "answer") == ""


def test_malformed_tool_call_is_an_error_piece_not_text() -> None:
    pieces, sp = split(QWEN3, ["Sure.", "<tool_call>", '{"name": get_weather}', "</tool_call>", " Bye"])
    assert [p.kind for p in pieces] == ["answer", "tool_error", "answer"]
    assert "tool_call" not in texts(pieces, "answer") and sp.tool_calls == []
    assert pieces[1].error


def test_unclosed_tool_call_at_end_is_still_parsed() -> None:
    pieces, _ = split(QWEN3, ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "X"}}\n'])
    assert [p.kind for p in pieces] == ["tool_call"]


def test_truncated_tool_call_is_dropped_with_an_error() -> None:
    pieces, _ = split(QWEN3_5, ["<tool_call>\n<function=get_weather>\n<parameter=city>\nOs"])
    assert [p.kind for p in pieces] == ["tool_error"]


def test_a_lone_angle_bracket_is_held_then_released() -> None:
    sp = OutputSplitter(QWEN3)
    assert [p.text for p in sp.feed("a <")] == ["a"]
    assert [p.text for p in sp.feed(" b")] == [" < b"]


def test_without_a_tool_parser_markup_is_text() -> None:
    fmt = ChatFormat("<think>", "</think>")
    pieces, _ = split(fmt, ["<tool_call>x</tool_call>"])
    assert texts(pieces, "answer") == "<tool_call>x</tool_call>"


@pytest.mark.parametrize(
    ("fmt", "text"),
    [
        (QWEN3, "[1, 2]"),
        (QWEN3, '{"arguments": {}}'),
        (QWEN3, '{"name": "f", "arguments": [1]}'),
        (QWEN3, '{"name": "f", "arguments": {"x": NaN}}'),
        (QWEN3, '{"name": "f", "arguments": "not json"}'),
        (QWEN3, "   "),
        (QWEN3, '{"name": "f", "arguments": {"x": "\\ud800"}}'),
        (QWEN3, '{"name": "\\udfff", "arguments": {}}'),
        (QWEN3_5, "<function=f>\n<parameter=x>\n1\n</parameter>"),
        (QWEN3_5, "no function at all"),
    ],
)
def test_parse_tool_text_rejects_cleanly(fmt: ChatFormat, text: str) -> None:
    with pytest.raises(ToolCallParseError):
        parse_tool_text(text, fmt, [WEATHER])


def test_qwen3_5_parameters_follow_the_schema_types() -> None:
    text = "<function=get_weather>\n<parameter=city>\n42\n</parameter>\n<parameter=days>\n7\n</parameter>\n</function>"
    (call,) = parse_tool_text(text, QWEN3_5, [WEATHER])
    assert call.arguments == {"city": "42", "days": 7}


def test_template_messages_shape() -> None:
    msgs = template_messages(
        [
            ChatMessage(role="assistant", content="", reasoning="r", tool_calls=[ToolCall("c1", "f", {"a": 1})]),
            ChatMessage(role="tool", content="ok", tool_call_id="c1", name="f"),
        ]
    )
    assert msgs[0]["reasoning_content"] == "r"
    assert msgs[0]["tool_calls"] == [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"a": 1}}}]
    assert msgs[1] == {"role": "tool", "content": "ok", "tool_call_id": "c1", "name": "f"}


@pytest.mark.parametrize("kind", ["qwen3", "qwen3_5"])
def test_render_prompt_uses_the_models_template_and_tools(tokenizers: dict, kind: str) -> None:
    tok = tokenizers[kind]
    fmt = ChatFormat.from_tokenizer(tok)
    assert fmt.supports_tools and fmt.supports_thinking
    conv = [
        ChatMessage(role="user", content="Weather in Oslo?"),
        ChatMessage(role="assistant", content="", tool_calls=[ToolCall("c1", "get_weather", {"city": "Oslo"})]),
        ChatMessage(role="tool", content='{"temp": 3}', tool_call_id="c1", name="get_weather"),
    ]
    ids = render_prompt(tok, conv, [WEATHER], thinking=False)
    text = tok.decode(ids)
    assert '"name": "get_weather"' in text  # the schema is in the system prompt
    assert "<tool_response>\n{\"temp\": 3}\n</tool_response>" in text
    assert ("<function=get_weather>" in text) == (kind == "qwen3_5")
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning(tok, ids)
    assert prompt_ends_in_reasoning(tok, ids + tok.encode("<think>\n", add_special_tokens=False))
    # Rendering is deterministic and the tool-free prompt is a different, shorter one.
    assert render_prompt(tok, conv, [WEATHER], thinking=False) == ids
    assert len(render_prompt(tok, conv, [], thinking=False)) < len(ids)


def test_render_prompt_reports_template_errors(tokenizers: dict) -> None:
    bad = [ChatMessage(role="assistant", content="", tool_calls=[ToolCall("c", "f", {})])]
    bad[0].tool_calls[0].arguments = "a string"  # type: ignore[index,assignment]
    with pytest.raises(RequestError, match="chat template"):
        render_prompt(tokenizers["qwen3_5"], bad)


class _Tokenizer:
    """A tokenizer with what render_prompt and prompt_ends_in_reasoning read, nothing else."""

    def __init__(self, has_chat_template: bool = True, has_thinking: bool = False, result: object = None) -> None:
        self.has_chat_template = has_chat_template
        self.has_thinking = has_thinking
        self.result = result
        self.calls: list[dict] = []

    def apply_chat_template(self, messages: list[dict], **kwargs: object) -> object:
        self.calls.append({"messages": messages, **kwargs})
        return self.result


def test_a_model_without_a_chat_template_is_named_as_the_cause() -> None:
    from engine.errors import TokenizerError

    tok = _Tokenizer(has_chat_template=False)
    with pytest.raises(TokenizerError, match=r"no chat template \(tokenizer_config\.json: chat_template\)"):
        render_prompt(tok, [ChatMessage(role="user", content="hi")])
    assert tok.calls == []  # refused before any rendering


def test_a_template_returning_an_encoding_gives_its_input_ids() -> None:
    tok = _Tokenizer(result={"input_ids": [5, 6, 7], "attention_mask": [1, 1, 1]})
    assert render_prompt(tok, [ChatMessage(role="user", content="hi")], thinking=True) == [5, 6, 7]
    assert tok.calls[0]["enable_thinking"] is True and tok.calls[0]["add_generation_prompt"] is True


def test_a_model_without_thinking_never_starts_in_reasoning() -> None:
    assert prompt_ends_in_reasoning(_Tokenizer(has_thinking=False), [1, 2, 3]) is False


def test_parse_tool_text_without_a_parser_or_with_an_empty_result() -> None:
    with pytest.raises(ToolCallParseError, match="this model has no tool-call parser"):
        parse_tool_text('{"name": "f"}', ChatFormat())
    empty = ChatFormat("<think>", "</think>", "<tool_call>", "</tool_call>", lambda text, tools: [])
    with pytest.raises(ToolCallParseError, match="tool call holds no call"):
        parse_tool_text('{"name": "f"}', empty)


def test_null_arguments_are_an_empty_object() -> None:
    (call,) = parse_tool_text('{"name": "get_weather", "arguments": null}', QWEN3, [WEATHER])
    assert call.name == "get_weather" and call.arguments == {}
