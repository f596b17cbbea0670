"""Render a stored conversation as a Markdown document."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from app.history.models import Conversation, Message

_ROLE_HEADINGS = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Tool"}
_BACKTICK_RUN = re.compile(r"`+")


def _fence(text: str, language: str = "") -> str:
    """A fenced code block whose fence is longer than any run of backticks inside `text`."""
    longest = max((len(run) for run in _BACKTICK_RUN.findall(text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def _local_time(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _format_figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def _tool_call_lines(call: Any) -> list[str]:
    if not isinstance(call, dict):  # stored as given; show anything unexpected as JSON
        return ["**Tool call:**", "", _fence(json.dumps(call, indent=2, ensure_ascii=False), "json"), ""]
    nested = call.get("function")
    function: dict[str, Any] = nested if isinstance(nested, dict) else call
    name = function.get("name", "?")
    arguments = function.get("arguments", "")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments else {}
        except ValueError:
            pass  # show what the model sent, even if it is not valid JSON
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, indent=2, ensure_ascii=False)
    call_id = f" (`{call['id']}`)" if isinstance(call.get("id"), str) else ""
    return [f"**Tool call:** `{name}`{call_id}", "", _fence(text, "json"), ""]


def _tool_result_lines(result: Any) -> list[str]:
    if not isinstance(result, dict):
        return ["**Tool result:**", "", _fence(json.dumps(result, indent=2, ensure_ascii=False)), ""]
    label = "Tool error" if result.get("is_error") else "Tool result"
    name = f" `{result['name']}`" if isinstance(result.get("name"), str) else ""
    content = result.get("content", "")
    text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False)
    return [f"**{label}:**{name}", "", _fence(text), ""]


def _message_lines(message: Message) -> list[str]:
    lines = [f"## {_ROLE_HEADINGS[message.role]}", ""]
    if message.reasoning:
        lines += ["<details><summary>Reasoning</summary>", "", message.reasoning, "", "</details>", ""]
    if message.role == "tool":
        call = f" for call `{message.tool_call_id}`" if message.tool_call_id else ""
        lines += [f"**Tool output{call}:**", "", _fence(message.content), ""]
    elif message.content:
        lines += [message.content, ""]
    for tool_call in message.tool_calls or []:
        lines += _tool_call_lines(tool_call)
    for tool_result in message.tool_results or []:
        lines += _tool_result_lines(tool_result)
    if message.partial:
        lines += ["*(This answer is incomplete: it was stopped or interrupted.)*", ""]
    if message.figures:
        figures = " · ".join(f"{key}: {_format_figure(value)}" for key, value in message.figures.items())
        lines += [f"<sub>{figures}</sub>", ""]
    return lines


def conversation_to_markdown(conversation: Conversation) -> str:
    """The whole conversation as Markdown: a title, a line of metadata, then one section per message."""
    meta = f"Created {_local_time(conversation.created_at)}, last updated {_local_time(conversation.updated_at)}"
    if conversation.model:
        meta = f"Model: {conversation.model} · {meta}"
    lines = [f"# {conversation.title}", "", f"*{meta}*", ""]
    for message in conversation.messages:
        lines += _message_lines(message)
    return "\n".join(lines).rstrip("\n") + "\n"
