"""The conversation as the window holds it: entries with their state, figures and attachments.

Entries map one-to-one onto protocol `ChatMessage`s (the whole list is sent with each chat
request) and onto rows of the history store; the extra fields say how an entry looks.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

from engine.serving.protocol import ChatMessage, MessageFigures, ToolCall

Role = Literal["system", "user", "assistant", "tool"]
EntryStatus = Literal["complete", "streaming", "stopped", "interrupted", "error"]
ToolState = Literal["awaiting", "running", "done", "error", "denied"]

_keys = itertools.count(1)


@dataclass
class Attachment:
    """A file or folder the user dropped with this message; the tools may read it."""

    path: str
    name: str
    size: int
    is_folder: bool = False


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
        return ChatMessage(
            role=self.role,
            content=self.content,
            reasoning=self.reasoning or None,
            tool_calls=list(self.tool_calls) or None,
            tool_call_id=self.tool_call_id,
            name=self.name,
        )


def request_messages(system_prompt: str, entries: list[ChatEntry]) -> list[ChatMessage]:
    """The messages of a chat request: the system prompt, then every entry in order.

    The system prompt carries the list of dropped files (DroppedFiles.describe_for_model), so
    user messages are sent exactly as typed.

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

