"""The conversation as the window holds it: entries with their state, figures and attachments.

Entries map one-to-one onto protocol `ChatMessage`s (the whole list is sent with each chat
request) and onto rows of the history store; the extra fields say how an entry looks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from engine.protocol import ChatMessage, MessageFigures, ToolCall

Role = Literal["system", "user", "assistant", "tool"]
EntryStatus = Literal["complete", "streaming", "stopped", "interrupted", "error"]
ToolState = Literal["awaiting", "running", "done", "error", "denied"]

_keys = itertools.count(1)


@dataclass
class Attachment:
    """A file the user dropped on this message; the tools may read it."""

    path: str
    name: str
    size: int


@dataclass
class ChatEntry:
    """One message of the conversation plus what the window shows about it."""

    role: Role
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    tool_call_id: str | None = None  # tool entries: the call this result answers
    name: str | None = None  # tool entries: the tool's name
    tool_state: ToolState = "done"  # tool entries: how the call went
    attachments: list[Attachment] = field(default_factory=list)
    figures: MessageFigures | None = None
    status: EntryStatus = "complete"
    note: str = ""  # why an answer is incomplete (stopped, engine crashed...)
    stored_id: int | None = None  # row id in the history store, once saved
    key: int = field(default_factory=lambda: next(_keys))  # stable id inside this window

    def is_incomplete(self) -> bool:
        """Whether this answer ended before the model finished it."""
        return self.status in ("stopped", "interrupted", "error")

    def to_chat_message(self) -> ChatMessage:
        """The protocol message sent to the engine for this entry."""
        content = self.content
        if self.role == "user" and self.attachments:
            listed = ", ".join(f"{a.name} ({a.path})" for a in self.attachments)
            content = f"{content}\n\n[Files attached for the tools to read: {listed}]"
        return ChatMessage(
            role=self.role,
            content=content,
            reasoning=self.reasoning or None,
            tool_calls=list(self.tool_calls) or None,
            tool_call_id=self.tool_call_id,
            name=self.name,
        )


def request_messages(system_prompt: str, entries: list[ChatEntry]) -> list[ChatMessage]:
    """The messages of a chat request: the system prompt, then every entry in order.

    Assistant entries that ended empty (stopped before any text and without tool calls)
    are left out: an empty assistant turn only confuses the model.
    """
    messages: list[ChatMessage] = []
    if system_prompt.strip():
        messages.append(ChatMessage(role="system", content=system_prompt))
    for entry in entries:
        if entry.role == "assistant" and not entry.content and not entry.tool_calls:
            continue
        messages.append(entry.to_chat_message())
    return messages


def tool_result_for(entries: list[ChatEntry], call_id: str) -> ChatEntry | None:
    """The tool entry answering `call_id`, if there is one yet."""
    for entry in entries:
        if entry.role == "tool" and entry.tool_call_id == call_id:
            return entry
    return None


def turn_span(entries: list[ChatEntry], index: int) -> tuple[int, int]:
    """The slice [start, end) of the answer that follows the user entry at `index`.

    An answer is every assistant and tool entry up to the next user entry; regenerating
    replaces that span, deleting an assistant entry removes its tool results with it.
    """
    end = index + 1
    while end < len(entries) and entries[end].role in ("assistant", "tool"):
        end += 1
    return index + 1, end
