"""OpenAI request bodies the other tests do not send: text parts, tool_choice "none", assistant tool
calls with arguments that are not JSON. Bad ones are a 400 naming the parameter."""

from __future__ import annotations

from typing import Any

import pytest

from engine.serving.openai_format import APIError, parse_completion_request

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}


def _body(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


def test_text_parts_are_joined_in_order() -> None:
    parsed = parse_completion_request(_body(
        {"role": "user", "content": [{"type": "text", "text": "Weather "}, {"type": "text", "text": "in Oslo?"}]}))
    assert parsed.chat.messages[0].content == "Weather in Oslo?"


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "text", "text": 5}], "messages[0].content[1].text"),
        (7, "messages[0].content"),
    ],
)
def test_bad_content_is_a_400_naming_the_part(content: Any, param: str) -> None:
    parts = [{"type": "text", "text": "ok"}, *content] if isinstance(content, list) else content
    with pytest.raises(APIError) as info:
        parse_completion_request(_body({"role": "user", "content": parts}))
    assert info.value.status == 400 and info.value.param == param and param in info.value.message


def test_tool_choice_none_sends_no_tools_to_the_model() -> None:
    with_tools = parse_completion_request(_body({"role": "user", "content": "hi"}, tools=[WEATHER]))
    assert [t["function"]["name"] for t in with_tools.chat.tools] == ["get_weather"]
    none = parse_completion_request(_body({"role": "user", "content": "hi"}, tools=[WEATHER], tool_choice="none"))
    assert none.chat.tools == []


@pytest.mark.parametrize("arguments", ['{"city": "Oslo"', "[1, 2"])
def test_assistant_tool_call_arguments_that_are_not_json_are_a_400(arguments: str) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
    with pytest.raises(APIError) as info:
        parse_completion_request(_body({"role": "user", "content": "hi"},
                                       {"role": "assistant", "content": None, "tool_calls": [call]}))  # fmt: skip
    assert info.value.status == 400
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    assert info.value.message == "messages[1].tool_calls[0].function.arguments is not valid JSON"


def test_assistant_tool_call_arguments_in_json_text_are_read() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    empty = {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": "  "}}
    parsed = parse_completion_request(_body({"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": None, "tool_calls": [call, empty]}))  # fmt: skip
    calls = parsed.chat.messages[1].tool_calls
    assert calls is not None and [(c.id, c.arguments) for c in calls] == [("c1", {"city": "Oslo"}), ("c2", {})]
