"""Chat history: conversations and messages in SQLite with full-text search and Markdown export."""

from app.history.export import conversation_to_markdown
from app.history.models import (
    ROLES,
    Conversation,
    ConversationSummary,
    HistoryCorruptError,
    HistoryError,
    HistoryVersionError,
    Message,
    NotFoundError,
    Role,
    SearchHit,
)
from app.history.schema import SCHEMA_VERSION
from app.history.store import KEEP, HistoryStore, open_history

__all__ = [
    "KEEP",
    "ROLES",
    "SCHEMA_VERSION",
    "Conversation",
    "ConversationSummary",
    "HistoryCorruptError",
    "HistoryError",
    "HistoryStore",
    "HistoryVersionError",
    "Message",
    "NotFoundError",
    "Role",
    "SearchHit",
    "conversation_to_markdown",
    "open_history",
]
