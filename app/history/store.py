"""The chat history database: conversations and messages in SQLite (WAL mode) with FTS5 search."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from app import paths
from app.history.export import conversation_to_markdown
from app.history.models import (
    ROLES,
    Conversation,
    ConversationSummary,
    HistoryCorruptError,
    HistoryError,
    Message,
    NotFoundError,
    SearchHit,
)
from app.history.schema import migrate

_SQLITE_CORRUPT = 11
_SQLITE_NOTADB = 26
_SQLITE_HEADER = b"SQLite format 3\x00"
_MAX_TITLE_CHARS = 500
# Private-use characters mark matches inside FTS5 snippets; they are turned into spans and removed.
_MARK_START, _MARK_END = "\ue000", "\ue001"
_SEARCH_TERM = re.compile(r"\w+")


def _now() -> float:
    return time.time()


class _Keep:
    """Marker for `update_message` arguments that were not given."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()


def _is_corruption(error: sqlite3.Error) -> bool:
    code = getattr(error, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def _move_aside(path: Path) -> Path:
    """Rename the database and its -wal/-shm files to `<name>.corrupt-<timestamp>[-wal|-shm]`."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{counter}")
    os.replace(path, target)
    for suffix in ("-wal", "-shm"):
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            os.replace(companion, target.with_name(target.name + suffix))
    return target


def _check_header(path: Path) -> None:
    """Refuse a file that is not SQLite before SQLite opens it (closing would delete its -wal file)."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(_SQLITE_HEADER))
    except OSError:
        return  # missing is fine (a new history); other errors surface from sqlite3.connect
    if header and header != _SQLITE_HEADER:
        error = sqlite3.DatabaseError("file is not a database")
        error.sqlite_errorcode = _SQLITE_NOTADB  # type: ignore[attr-defined]
        raise error


def _connect(path: Path) -> sqlite3.Connection:
    """Open `path`, check it is a sound database and bring its schema up to date."""
    _check_header(path)
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")  # with WAL: an app crash never loses committed data
        db.execute("PRAGMA foreign_keys = ON")
        problems = [row[0] for row in db.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            error = sqlite3.DatabaseError("; ".join(problems))
            error.sqlite_errorcode = _SQLITE_CORRUPT  # type: ignore[attr-defined]
            raise error
        migrate(db)
    except BaseException:
        db.close()
        raise
    return db


def _to_json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serializable: {exc}") from exc


def _optional_json(value: Any, what: str) -> str | None:
    return None if value is None else _to_json(value, what)


def _clean_title(title: str) -> str:
    title = " ".join(title.split())[:_MAX_TITLE_CHARS]
    return title or "Untitled"


def _message_from_row(row: sqlite3.Row) -> Message:
    return Message(
        id=row["id"], conversation_id=row["conversation_id"], position=row["position"], role=row["role"],
        content=row["content"], reasoning=row["reasoning"],
        tool_calls=json.loads(row["tool_calls"]) if row["tool_calls"] is not None else None,
        tool_call_id=row["tool_call_id"],
        tool_results=json.loads(row["tool_results"]) if row["tool_results"] is not None else None,
        figures=json.loads(row["figures"]), partial=bool(row["partial"]),
        created_at=row["created_at"], updated_at=row["updated_at"])


def _fts_query(text: str) -> str | None:
    """Turn what the user typed into a safe FTS5 query: all words must appear, the last as a prefix."""
    terms = _SEARCH_TERM.findall(text)
    if not terms:
        return None
    quoted = [f'"{term}"' for term in terms]  # \w+ never holds a quote, so no escaping is needed
    quoted[-1] += "*"
    return " ".join(quoted)


def _split_highlights(marked: str) -> tuple[str, list[tuple[int, int]]]:
    text: list[str] = []
    spans: list[tuple[int, int]] = []
    start = None
    length = 0
    for char in marked:
        if char == _MARK_START:
            start = length
        elif char == _MARK_END:
            if start is not None and length > start:
                spans.append((start, length))
            start = None
        else:
            text.append(char)
            length += 1
    return "".join(text), spans


class HistoryStore:
    """Conversations and their messages, safe to use from several threads (one connection, one lock).

    Opening a damaged database moves it aside and raises HistoryCorruptError (message for the UI);
    opening again then starts an empty history. Use `open_history()` to get both steps at once.
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path if path is not None else paths.history_db_path()
        paths.ensure_dir(self.path.parent)
        self._lock = threading.RLock()
        try:
            self._db = _connect(self.path)
        except sqlite3.Error as exc:
            if not _is_corruption(exc):
                raise HistoryError(
                    f"Could not open the chat history at {self.path}: {exc}. If another MoeBar is "
                    "running, quit it and try again.") from exc
            try:
                moved_to = _move_aside(self.path)
            except OSError as move_error:
                raise HistoryError(
                    f"Your chat history at {self.path} is damaged ({exc}) and could not be moved aside "
                    f"({move_error.strerror or move_error}). Move or delete that file yourself, then restart "
                    "MoeBar.") from exc
            raise HistoryCorruptError(
                f"Your chat history could not be read because the file is damaged ({exc}). It was moved "
                f"to {moved_to}, so nothing was deleted, and MoeBar starts a new, empty history. Keep "
                "that file if you want to try recovering it (sqlite3's .recover command), or delete it.",
                self.path, moved_to) from exc
        self._db.row_factory = sqlite3.Row

    def close(self) -> None:
        """Close the database; the store cannot be used afterwards."""
        with self._lock:
            try:
                self._db.execute("PRAGMA optimize")
            except sqlite3.Error:
                pass  # optimisation is best-effort; closing must not fail because of it
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _transaction(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    yield self._db
                except BaseException:
                    if self._db.in_transaction:  # SQLite may already have rolled back (e.g. disk full)
                        self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self._wrap(exc, action) from exc

    @contextmanager
    def _reading(self, action: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise self._wrap(exc, action) from exc

    def _wrap(self, exc: sqlite3.Error, action: str) -> HistoryError:
        if _is_corruption(exc):
            return HistoryError(f"Could not {action}: the history database {self.path} is damaged ({exc}). "
                                "Restart MoeBar; it will move the damaged file aside and start a new history.")
        return HistoryError(f"Could not {action}: {exc}.")

    def _touch(self, db: sqlite3.Connection, conversation_id: int, now: float) -> None:
        cursor = db.execute("UPDATE conversations SET updated_at = ? WHERE id = ?", (now, conversation_id))
        if cursor.rowcount == 0:
            raise NotFoundError(f"No conversation with id {conversation_id}.")

    def create_conversation(self, title: str = "New chat", model: str = "") -> int:
        """Start a conversation; returns its id."""
        now = _now()
        with self._transaction("create a conversation") as db:
            cursor = db.execute(
                "INSERT INTO conversations (title, model, created_at, updated_at) VALUES (?, ?, ?, ?)",
                (_clean_title(title), model, now, now))
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def append_message(self, conversation_id: int, role: str, content: str = "", *, reasoning: str = "",
                       tool_calls: list[dict[str, Any]] | None = None, tool_call_id: str | None = None,
                       tool_results: list[dict[str, Any]] | None = None,
                       figures: dict[str, Any] | None = None, partial: bool = False) -> int:
        """Add a message at the end of a conversation; returns its id. Pass partial=True while streaming."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        values = (role, content, reasoning, _optional_json(tool_calls, "tool_calls"), tool_call_id,
                  _optional_json(tool_results, "tool_results"), _to_json(figures or {}, "figures"), int(partial))
        now = _now()
        with self._transaction("save the message") as db:
            self._touch(db, conversation_id, now)
            cursor = db.execute(
                """INSERT INTO messages (conversation_id, position, role, content, reasoning, tool_calls,
                       tool_call_id, tool_results, figures, partial, created_at, updated_at)
                   VALUES (?, (SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation_id = ?),
                           ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
                (conversation_id, conversation_id, *values, now, now))
            assert cursor.lastrowid is not None
            return cursor.lastrowid

    def update_message(self, message_id: int, *, content: str | _Keep = KEEP, reasoning: str | _Keep = KEEP,
                       tool_calls: list[dict[str, Any]] | None | _Keep = KEEP,
                       tool_results: list[dict[str, Any]] | None | _Keep = KEEP,
                       figures: dict[str, Any] | _Keep = KEEP, partial: bool | _Keep = KEEP) -> None:
        """Replace the given fields of a message (the full text so far while streaming; partial=False when done)."""
        changes: dict[str, Any] = {}
        if not isinstance(content, _Keep):
            changes["content"] = content
        if not isinstance(reasoning, _Keep):
            changes["reasoning"] = reasoning
        if not isinstance(tool_calls, _Keep):
            changes["tool_calls"] = _optional_json(tool_calls, "tool_calls")
        if not isinstance(tool_results, _Keep):
            changes["tool_results"] = _optional_json(tool_results, "tool_results")
        if not isinstance(figures, _Keep):
            changes["figures"] = _to_json(figures, "figures")
        if not isinstance(partial, _Keep):
            changes["partial"] = int(partial)
        now = _now()
        changes["updated_at"] = now
        assignments = ", ".join(f"{column} = ?" for column in changes)  # column names are ours, not input
        with self._transaction("update the message") as db:
            row = db.execute("SELECT conversation_id FROM messages WHERE id = ?", (message_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"No message with id {message_id}.")
            db.execute(f"UPDATE messages SET {assignments} WHERE id = ?", (*changes.values(), message_id))
            self._touch(db, row[0], now)

    def delete_message(self, message_id: int) -> None:
        """Remove one message (e.g. an answer that is being regenerated)."""
        with self._transaction("delete the message") as db:
            if db.execute("DELETE FROM messages WHERE id = ?", (message_id,)).rowcount == 0:
                raise NotFoundError(f"No message with id {message_id}.")

    def rename_conversation(self, conversation_id: int, title: str) -> None:
        """Change a conversation's title (whitespace is collapsed; empty becomes 'Untitled')."""
        with self._transaction("rename the conversation") as db:
            cursor = db.execute("UPDATE conversations SET title = ? WHERE id = ?", (_clean_title(title), conversation_id))
            if cursor.rowcount == 0:
                raise NotFoundError(f"No conversation with id {conversation_id}.")

    def delete_conversation(self, conversation_id: int) -> None:
        """Delete a conversation and all its messages."""
        with self._transaction("delete the conversation") as db:
            if db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,)).rowcount == 0:
                raise NotFoundError(f"No conversation with id {conversation_id}.")

    def list_conversations(self, limit: int = 500, offset: int = 0) -> list[ConversationSummary]:
        """Conversations, most recently updated first."""
        with self._reading("list conversations") as db:
            rows = db.execute(
                """SELECT c.id, c.title, c.model, c.created_at, c.updated_at,
                          (SELECT COUNT(*) FROM messages m WHERE m.conversation_id = c.id) AS message_count
                   FROM conversations c ORDER BY c.updated_at DESC, c.id DESC LIMIT ? OFFSET ?""",
                (limit, offset)).fetchall()
        return [ConversationSummary(**dict(row)) for row in rows]

    def get_conversation(self, conversation_id: int) -> Conversation:
        """One conversation with all its messages in order."""
        with self._reading("load the conversation") as db:
            row = db.execute("SELECT id, title, model, created_at, updated_at FROM conversations WHERE id = ?",
                             (conversation_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"No conversation with id {conversation_id}.")
            messages = db.execute("SELECT * FROM messages WHERE conversation_id = ? ORDER BY position",
                                  (conversation_id,)).fetchall()
        return Conversation(**dict(row), messages=[_message_from_row(m) for m in messages])

    def get_message(self, message_id: int) -> Message:
        """One message by id."""
        with self._reading("load the message") as db:
            row = db.execute("SELECT * FROM messages WHERE id = ?", (message_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"No message with id {message_id}.")
        return _message_from_row(row)

    def search(self, text: str, limit: int = 50) -> list[SearchHit]:
        """Conversations whose messages contain every word of `text` (last word as a prefix), best match first."""
        query = _fts_query(text)
        if query is None:
            return []
        hits: dict[int, SearchHit] = {}
        with self._reading("search the history") as db:
            # FTS5 returns rows in rank order lazily, so snippet() runs only for the rows read here; stop as
            # soon as `limit` conversations have their best message.
            cursor = db.execute(
                """SELECT m.conversation_id, c.title, m.id AS message_id, m.role,
                          snippet(messages_fts, -1, ?, ?, '…', 16) AS marked
                   FROM messages_fts
                   JOIN messages m ON m.id = messages_fts.rowid
                   JOIN conversations c ON c.id = m.conversation_id
                   WHERE messages_fts MATCH ? ORDER BY messages_fts.rank""",
                (_MARK_START, _MARK_END, query))
            try:
                for row in cursor:
                    if row["conversation_id"] in hits:
                        continue
                    snippet, spans = _split_highlights(row["marked"])
                    hits[row["conversation_id"]] = SearchHit(
                        conversation_id=row["conversation_id"], title=row["title"], message_id=row["message_id"],
                        role=row["role"], snippet=snippet, highlights=spans)
                    if len(hits) == limit:
                        break
            finally:
                cursor.close()  # ends the read so WAL checkpoints are not held back
        return list(hits.values())

    def export_markdown(self, conversation_id: int) -> str:
        """The conversation as a Markdown document (reasoning, tool calls and figures included)."""
        return conversation_to_markdown(self.get_conversation(conversation_id))


def open_history(path: Path | None = None) -> tuple[HistoryStore, str | None]:
    """Open the history; if it was damaged, move it aside, start a new one and return the message to show."""
    try:
        return HistoryStore(path), None
    except HistoryCorruptError as exc:
        return HistoryStore(path), str(exc)
