"""Chat formatting: the model's own template, <think> splitting and tool-call parsing.

The template and the tool parser come from mlx-lm's TokenizerWrapper (the model's
tokenizer_config.json picks them). Generated text is split into reasoning, answer and tool-call
pieces by `OutputSplitter`; tool-call markup is parsed with mlx-lm's parser and never returned
as answer text.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from engine.errors import MoeBarError, RequestError, TokenizerError
from engine.serving.protocol import ChatMessage

log = logging.getLogger(__name__)

ToolParser = Callable[[str, Any], Any]
PieceKind = Literal["reasoning", "answer", "tool_call", "tool_error"]


class ToolCallParseError(MoeBarError):
    """The model wrote tool-call markup that the model's tool parser cannot read."""

    code = "bad_tool_call"


@dataclass
class ParsedToolCall:
    """A tool call read from model output, with a fresh unique id."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: new_call_id())


@dataclass
class Piece:
    """One piece of split model output."""

    kind: PieceKind
    text: str = ""  # reasoning/answer text, or the raw markup of a tool_error
    call: ParsedToolCall | None = None  # set for tool_call
    error: str = ""  # set for tool_error


@dataclass(frozen=True)
class ChatFormat:
    """The markers and tool parser of one tokenizer (None where the model has none)."""

    think_start: str | None = None
    think_end: str | None = None
    tool_start: str | None = None
    tool_end: str | None = None
    tool_parser: ToolParser | None = None

    @classmethod
    def from_tokenizer(cls, tokenizer: Any) -> "ChatFormat":
        """Read the markers and parser that mlx-lm inferred for this tokenizer."""
        parser = getattr(tokenizer, "tool_parser", None)
        start = getattr(tokenizer, "tool_call_start", None)
        end = getattr(tokenizer, "tool_call_end", None)
        has_tools = parser is not None and bool(start) and bool(end)
        return cls(
            think_start=getattr(tokenizer, "think_start", None) or None,
            think_end=getattr(tokenizer, "think_end", None) or None,
            tool_start=start if has_tools else None,
            tool_end=end if has_tools else None,
            tool_parser=parser if has_tools else None,
        )

    @property
    def supports_tools(self) -> bool:
        """Whether tool calls can be parsed from this model's output."""
        return self.tool_parser is not None

    @property
    def supports_thinking(self) -> bool:
        """Whether the model writes <think> reasoning."""
        return self.think_start is not None and self.think_end is not None


def new_call_id() -> str:
    """Return a fresh, unique, non-empty tool-call id."""
    return "call_" + uuid.uuid4().hex[:24]


def template_messages(messages: Sequence[ChatMessage]) -> list[dict[str, Any]]:
    """Convert protocol messages to the dicts chat templates expect (OpenAI shape)."""
    out: list[dict[str, Any]] = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content}
        if m.role == "assistant" and m.reasoning:
            d["reasoning_content"] = m.reasoning
        if m.role == "assistant" and m.tool_calls:
            d["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in m.tool_calls
            ]
        if m.role == "tool":
            if m.tool_call_id is not None:
                d["tool_call_id"] = m.tool_call_id
            if m.name is not None:
                d["name"] = m.name
        out.append(d)
    return out


def render_prompt(
    tokenizer: Any,
    messages: Sequence[ChatMessage],
    tools: Sequence[dict[str, Any]] = (),
    thinking: bool | None = None,
    add_generation_prompt: bool = True,
) -> list[int]:
    """Render a conversation with the model's chat template and return its token ids."""
    if not getattr(tokenizer, "has_chat_template", False):
        raise TokenizerError("the model has no chat template (tokenizer_config.json: chat_template)")
    kwargs: dict[str, Any] = {"add_generation_prompt": add_generation_prompt}
    if tools:
        kwargs["tools"] = list(tools)
    if thinking is not None:
        kwargs["enable_thinking"] = thinking
    try:
        tokens = tokenizer.apply_chat_template(template_messages(messages), **kwargs)
    except Exception as exc:  # jinja2 errors (raise_exception in templates) and type errors
        raise RequestError(f"chat template rejected the conversation: {exc}") from exc
    if isinstance(tokens, dict) or hasattr(tokens, "input_ids"):
        tokens = tokens["input_ids"]
    return [int(t) for t in tokens]


def prompt_ends_in_reasoning(tokenizer: Any, prompt: Sequence[int]) -> bool:
    """Whether the prompt leaves the model inside <think> (template opened it)."""
    if not getattr(tokenizer, "has_thinking", False):
        return False
    start = tokenizer.rfind_think_start(list(prompt))
    end = tokenizer.rfind_think_end(list(prompt))
    return bool(start >= 0 and start > end)


def parse_tool_text(text: str, fmt: ChatFormat, tools: Sequence[dict[str, Any]] = ()) -> list[ParsedToolCall]:
    """Parse the text between tool-call markers; raises ToolCallParseError, never anything else."""
    if fmt.tool_parser is None:
        raise ToolCallParseError("this model has no tool-call parser")
    body = text.strip()
    if not body:
        raise ToolCallParseError("empty tool call")
    try:
        parsed = fmt.tool_parser(body, list(tools) or None)
    except Exception as exc:  # parsers raise ValueError, JSONDecodeError, KeyError, TypeError...
        raise ToolCallParseError(f"tool call could not be parsed ({type(exc).__name__}: {exc})") from None
    items = parsed if isinstance(parsed, list) else [parsed]
    if not items:
        raise ToolCallParseError("tool call holds no call")
    return [_checked_call(item) for item in items]


def _checked_call(item: Any) -> ParsedToolCall:
    if not isinstance(item, dict):
        raise ToolCallParseError(f"tool call must be an object, got {type(item).__name__}")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ToolCallParseError("tool call has no function name")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ToolCallParseError("tool call's function name is not valid text") from None
    args = item.get("arguments", {})
    if args is None:
        args = {}
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            raise ToolCallParseError(f"arguments of {name!r} are not JSON") from None
    if not isinstance(args, dict):
        raise ToolCallParseError(f"arguments of {name!r} must be an object, got {type(args).__name__}")
    try:  # normalise to plain JSON (tuples from literal_eval become lists; NaN and lone surrogates refused)
        text = json.dumps(args, allow_nan=False, ensure_ascii=False)
        text.encode("utf-8")
        args = json.loads(text)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ToolCallParseError(f"arguments of {name!r} are not plain JSON ({exc})") from None
    return ParsedToolCall(name=name.strip(), arguments=args)


class OutputSplitter:
    """Split streamed model text into reasoning, answer and tool-call pieces.

    Markers are matched on text, so a marker split across token boundaries still matches;
    a tail that could be the start of a marker is held back until it is decided. Whitespace
    at the start of a section and before a marker is dropped (the template's separators).
    """

    def __init__(self, fmt: ChatFormat, tools: Sequence[dict[str, Any]] = (), in_reasoning: bool = False):
        self.fmt = fmt
        self.tools = list(tools)
        self.state: Literal["reasoning", "answer", "tool"] = "reasoning" if in_reasoning else "answer"
        self._return_state: Literal["reasoning", "answer"] = self.state
        self._buf = ""  # undecided text (possible marker prefix or held whitespace)
        self._tool_text = ""
        self._section_start = True  # nothing emitted yet in the current section
        self._ws = ""  # trailing whitespace of the section, emitted only if more text follows
        self.tool_calls: list[ParsedToolCall] = []
        self.answer = ""
        self.reasoning = ""

    def feed(self, text: str) -> list[Piece]:
        """Add generated text; return the pieces that are now decided."""
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Piece]:
        """Flush at the end of generation (an unclosed tool call is parsed as it stands)."""
        pieces = self._drain(final=True)
        if self.state == "tool":
            pieces.extend(self._close_tool())
        return pieces

    # -- internals

    def _markers(self) -> list[tuple[str, str]]:
        f = self.fmt
        found: list[tuple[str, str]] = []
        if self.state == "tool":
            return [("tool_end", f.tool_end)] if f.tool_end else []
        if f.tool_start:
            found.append(("tool_start", f.tool_start))
        if f.think_start:
            found.append(("think_start", f.think_start))
        if f.think_end:
            found.append(("think_end", f.think_end))
        if f.tool_end:  # a stray closing marker is markup too: drop it
            found.append(("tool_end", f.tool_end))
        return found

    def _drain(self, final: bool) -> list[Piece]:
        pieces: list[Piece] = []
        while True:
            markers = self._markers()
            hit = min(
                ((self._buf.find(m), name, m) for name, m in markers if m in self._buf),
                default=None,
            )
            if hit is None:
                keep = 0 if final else _held_prefix(self._buf, [m for _, m in markers])
                self._take(self._buf[: len(self._buf) - keep], pieces)
                self._buf = self._buf[len(self._buf) - keep :]
                if final:
                    self._ws = ""
                return pieces
            pos, name, marker = hit
            self._take(self._buf[:pos], pieces)
            self._ws = ""  # whitespace before a marker is the template's separator
            self._buf = self._buf[pos + len(marker) :]
            pieces.extend(self._switch(name))

    def _take(self, text: str, pieces: list[Piece]) -> None:
        """Route decided text to the current section; trailing whitespace waits for more text."""
        if self.state == "tool":
            self._tool_text += text
            return
        if self._section_start:
            text = text.lstrip()
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body) :]
        if not body:
            return
        self._section_start = False
        if self.state == "reasoning":
            self.reasoning += body
            pieces.append(Piece(kind="reasoning", text=body))
        else:
            self.answer += body
            pieces.append(Piece(kind="answer", text=body))

    def _switch(self, name: str) -> list[Piece]:
        if name == "tool_start":
            self._return_state = "reasoning" if self.state == "reasoning" else "answer"
            self.state = "tool"
            self._tool_text = ""
            return []
        if name == "tool_end":
            return self._close_tool() if self.state == "tool" else []
        if name == "think_start":
            self.state = "reasoning"
        elif name == "think_end":
            self.state = "answer"
        self._section_start = True
        return []

    def _close_tool(self) -> list[Piece]:
        text, self._tool_text = self._tool_text, ""
        self.state = self._return_state
        self._section_start = True
        try:
            calls = parse_tool_text(text, self.fmt, self.tools)
        except ToolCallParseError as exc:
            log.warning("dropped a tool call: %s", exc)
            return [Piece(kind="tool_error", text=text, error=str(exc))]
        self.tool_calls.extend(calls)
        return [Piece(kind="tool_call", call=c) for c in calls]


def _held_prefix(text: str, markers: Sequence[str]) -> int:
    """Length of the longest tail of text that is a proper prefix of a marker."""
    best = 0
    for m in markers:
        for n in range(min(len(m) - 1, len(text)), best, -1):
            if text.endswith(m[:n]):
                best = n
                break
    return best
