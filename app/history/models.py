"""Data types and errors of the chat history."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["system", "user", "assistant", "tool"]
ROLES: tuple[str, ...] = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class Message:
    """One stored message. `partial` means the answer was cut short (stopped, engine crash) or is still streaming."""

    id: int
    conversation_id: int
    position: int
    role: Role
    content: str
    reasoning: str
    tool_calls: list[dict[str, Any]] | None
    tool_call_id: str | None
    tool_results: list[dict[str, Any]] | None
    figures: dict[str, Any]
    partial: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class ConversationSummary:
    """A row of the conversation list (most recently updated first)."""

    id: int
    title: str
    model: str
    created_at: float
    updated_at: float
    message_count: int


@dataclass(frozen=True)
class Conversation:
    """A conversation with all its messages in order."""

    id: int
    title: str
    model: str
    created_at: float
    updated_at: float
    messages: list[Message] = field(default_factory=list)


@dataclass(frozen=True)
class SearchHit:
    """The best match of a search in one conversation.

    `snippet` is plain text around the match; `highlights` are (start, end) character spans of
    `snippet` that matched the query, for the UI to emphasise.
    """

    conversation_id: int
    title: str
    message_id: int
    role: Role
    snippet: str
    highlights: list[tuple[int, int]]


class HistoryError(Exception):
    """A history operation failed; the message says what to do."""


class HistoryCorruptError(HistoryError):
    """The history database was unreadable and has been moved aside; a new one can be opened."""

    def __init__(self, message: str, path: Path, moved_to: Path) -> None:
        super().__init__(message)
        self.path = path
        self.moved_to = moved_to


class HistoryVersionError(HistoryError):
    """The database was written by a newer MoeBar with a schema this version does not know."""


class NotFoundError(HistoryError, KeyError):
    """No conversation or message with that id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"
