"""OpenAI chat-completions JSON <-> MoeBar protocol: request parsing and response/chunk building."""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from engine.serving.protocol import (
    ChatMessage,
    ChatRequest,
    MessageFigures,
    ProtocolError,
    ToolCall,
    check_tool_schema,
)
from engine.types import SamplingParams

DEFAULT_MAX_TOKENS = 2048
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The OpenAI-style error body."""
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


@dataclass
class CompletionRequest:
    """A parsed /v1/chat/completions body."""

    chat: ChatRequest
    stream: bool
    include_usage: bool
    model: str | None = None  # the name the client asked for (None or "" when it sent none)


def parse_completion_request(body: Any) -> CompletionRequest:
    """Check an OpenAI chat-completions body and turn it into a ChatRequest; raises APIError 400."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    try:
        return _parse(body)
    except ProtocolError as exc:
        raise APIError(400, str(exc), param=exc.field) from None


def _parse(body: dict[str, Any]) -> CompletionRequest:
    model = body.get("model")
    _need(model is None or isinstance(model, str), "model", "must be a string")
    messages = body.get("messages")
    _need(isinstance(messages, list) and len(messages) > 0, "messages", "must be a non-empty list")
    assert isinstance(messages, list)
    parsed = [_message(m, f"messages[{i}]") for i, m in enumerate(messages)]
    n = body.get("n", 1)
    _need(n in (None, 1), "n", "only n=1 is supported")
    stop = body.get("stop")
    _need(stop in (None, [], ""), "stop", "stop sequences are not supported")
    tools = body.get("tools") or []
    _need(isinstance(tools, list), "tools", "must be a list")
    for i, tool in enumerate(tools):
        check_tool_schema(tool, f"tools[{i}]")
    choice = body.get("tool_choice", "auto")
    _need(choice in (None, "auto", "none"), "tool_choice", 'only "auto" and "none" are supported')
    if choice == "none":
        tools = []
    sampling = SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=int(_number(body, "top_k", 0, 0, 1 << 20, integer=True)),
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, 10.0, low_open=True),
        max_tokens=int(
            _number(body, "max_completion_tokens", None, 1, 1 << 24, integer=True)
            or _number(body, "max_tokens", DEFAULT_MAX_TOKENS, 1, 1 << 24, integer=True)
        ),
        seed=int(s) if (s := _number(body, "seed", None, -(1 << 63), (1 << 63) - 1, integer=True)) is not None else None,
        logit_bias=_logit_bias(body),
    )
    stream = body.get("stream", False)
    _need(isinstance(stream, bool) or stream is None, "stream", "must be true or false")
    options = body.get("stream_options") or {}
    _need(isinstance(options, dict), "stream_options", "must be an object")
    include_usage = options.get("include_usage", False)
    _need(isinstance(include_usage, bool), "stream_options.include_usage", "must be true or false")
    thinking = _thinking(body)
    chat = ChatRequest(
        id="chatcmpl-" + uuid.uuid4().hex[:24], messages=parsed, tools=tools, sampling=sampling, thinking=thinking
    )
    chat.check()
    return CompletionRequest(chat=chat, stream=bool(stream), include_usage=include_usage, model=model)


def _logit_bias(body: dict[str, Any]) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias in [-100, 100]}; ids are checked against the model later."""
    bias = body.get("logit_bias")
    if bias is None or bias == {}:
        return None
    _need(isinstance(bias, dict), "logit_bias", "must be an object mapping token ids to biases")
    checked: dict[int, float] = {}
    for key, value in bias.items():
        _need(key.strip().isascii() and key.strip().isdigit() and len(key.strip()) <= 12, "logit_bias", f"keys must be token ids, got {key[:40]!r}")
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        _need(ok and -100 <= value <= 100, "logit_bias", f"[{key.strip()}] must be a number in [-100, 100]")
        checked[int(key)] = float(value)
    return checked


def _thinking(body: dict[str, Any]) -> bool | None:
    kwargs = body.get("chat_template_kwargs") or {}
    _need(isinstance(kwargs, dict), "chat_template_kwargs", "must be an object")
    value = kwargs.get("enable_thinking", body.get("enable_thinking"))
    _need(value is None or isinstance(value, bool), "chat_template_kwargs.enable_thinking", "must be true or false")
    return value


def _message(m: Any, where: str) -> ChatMessage:
    _need(isinstance(m, dict), where, "must be an object")
    role = _ROLES.get(m.get("role")) if isinstance(m.get("role"), str) else None
    _need(role is not None, f"{where}.role", f"must be one of {sorted(_ROLES)}")
    content = _text(m.get("content"), f"{where}.content")
    calls = None
    if role == "assistant" and m.get("tool_calls"):
        raw = m["tool_calls"]
        _need(isinstance(raw, list), f"{where}.tool_calls", "must be a list")
        calls = [_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(raw)]
    reasoning = m.get("reasoning_content", m.get("reasoning"))
    _need(reasoning is None or isinstance(reasoning, str), f"{where}.reasoning_content", "must be a string")
    call_id = m.get("tool_call_id")
    _need(call_id is None or isinstance(call_id, str), f"{where}.tool_call_id", "must be a string")
    name = m.get("name")
    _need(name is None or isinstance(name, str), f"{where}.name", "must be a string")
    return ChatMessage(
        role=role,  # type: ignore[arg-type]
        content=content,
        reasoning=reasoning if role == "assistant" else None,
        tool_calls=calls,
        tool_call_id=call_id if role == "tool" else None,
        name=name if role == "tool" else None,
    )


def _text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    _need(isinstance(content, list), where, "must be a string or a list of text parts")
    parts = []
    for i, part in enumerate(content):
        _need(isinstance(part, dict) and part.get("type") == "text", f"{where}[{i}]", "only text parts are supported")
        _need(isinstance(part.get("text"), str), f"{where}[{i}].text", "must be a string")
        parts.append(part["text"])
    return "".join(parts)


def _tool_call(c: Any, where: str) -> ToolCall:
    _need(isinstance(c, dict), where, "must be an object")
    fn = c.get("function")
    _need(isinstance(fn, dict), f"{where}.function", "must be an object")
    name = fn.get("name")
    _need(isinstance(name, str) and bool(name), f"{where}.function.name", "must be a non-empty string")
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            raise APIError(400, f"{where}.function.arguments is not valid JSON", param=f"{where}.function.arguments") from None
    _need(isinstance(args, dict), f"{where}.function.arguments", "must be a JSON object")
    call_id = c.get("id")
    _need(call_id is None or isinstance(call_id, str), f"{where}.id", "must be a string")
    return ToolCall(id=call_id or "", name=name, arguments=args)


def _number(
    body: dict[str, Any],
    key: str,
    default: Any,
    low: float,
    high: float,
    *,
    integer: bool = False,
    low_open: bool = False,
) -> Any:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
    if integer:
        ok = ok and (isinstance(value, int) or float(value).is_integer())  # no float() of a huge int (OverflowError)
    ok = ok and (low < value if low_open else low <= value) and value <= high
    bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
    _need(ok, key, f"must be {'an integer' if integer else 'a number'} in {bound}")
    return value


def _need(ok: bool, param: str, problem: str) -> None:
    if not ok:
        raise APIError(400, f"{param} {problem}", param=param)


# ---------------------------------------------------------------- responses


def usage(figures: MessageFigures) -> dict[str, Any]:
    """OpenAI usage object (prompt tokens include those served by the prompt cache)."""
    prompt = figures.prompt_tokens + figures.reused_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": figures.generated_tokens,
        "total_tokens": prompt + figures.generated_tokens,
        "prompt_tokens_details": {"cached_tokens": figures.reused_tokens},
    }


def openai_finish_reason(reason: str) -> str:
    """Map a done event's finish reason to OpenAI's (cancelled ends like a stop)."""
    return {"length": "length", "tool_calls": "tool_calls"}.get(reason, "stop")


def tool_call_json(call_id: str, name: str, arguments: dict[str, Any], index: int | None = None) -> dict[str, Any]:
    """An OpenAI tool_calls entry (arguments as a JSON string)."""
    out: dict[str, Any] = {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }
    if index is not None:
        out["index"] = index
    return out


def completion(
    request_id: str,
    model: str,
    content: str,
    reasoning: str,
    tool_calls: list[dict[str, Any]],
    finish_reason: str,
    figures: MessageFigures,
) -> dict[str, Any]:
    """A whole (not streamed) chat.completion object."""
    message: dict[str, Any] = {"role": "assistant", "content": content or None}
    if reasoning:
        message["reasoning_content"] = reasoning
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": openai_finish_reason(finish_reason), "logprobs": None}],
        "usage": usage(figures),
    }


def chunk(request_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    """One chat.completion.chunk with a single choice."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
    }


def usage_chunk(request_id: str, model: str, figures: MessageFigures) -> dict[str, Any]:
    """The last streamed chunk when stream_options.include_usage is set (no choices)."""
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": usage(figures),
    }
