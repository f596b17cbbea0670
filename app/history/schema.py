"""History database schema and its migrations, tracked with SQLite's `user_version`.

Each migration moves the schema from version N to N+1 inside one transaction. Never edit a
migration that has shipped; append a new one instead.
"""

from __future__ import annotations

import sqlite3

from app.history.models import HistoryVersionError

_CORE_TABLES = (
    """CREATE TABLE conversations (
        id          INTEGER PRIMARY KEY,
        title       TEXT NOT NULL,
        model       TEXT NOT NULL DEFAULT '',
        created_at  REAL NOT NULL,
        updated_at  REAL NOT NULL
    )""",
    "CREATE INDEX conversations_by_update ON conversations(updated_at DESC, id DESC)",
    """CREATE TABLE messages (
        id              INTEGER PRIMARY KEY,
        conversation_id INTEGER NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        position        INTEGER NOT NULL,
        role            TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant', 'tool')),
        content         TEXT NOT NULL DEFAULT '',
        reasoning       TEXT NOT NULL DEFAULT '',
        tool_calls      TEXT,
        tool_call_id    TEXT,
        tool_results    TEXT,
        figures         TEXT NOT NULL DEFAULT '{}',
        partial         INTEGER NOT NULL DEFAULT 0 CHECK (partial IN (0, 1)),
        created_at      REAL NOT NULL,
        updated_at      REAL NOT NULL,
        UNIQUE (conversation_id, position)
    )""",
)

# External-content FTS5 table: the text lives once, in `messages`; triggers keep the index in step.
_FULL_TEXT_INDEX = (
    """CREATE VIRTUAL TABLE messages_fts USING fts5(
        content, reasoning,
        content='messages', content_rowid='id',
        tokenize='unicode61 remove_diacritics 2'
    )""",
    """CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN
        INSERT INTO messages_fts(rowid, content, reasoning) VALUES (new.id, new.content, new.reasoning);
    END""",
    """CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content, reasoning)
            VALUES ('delete', old.id, old.content, old.reasoning);
    END""",
    """CREATE TRIGGER messages_fts_update AFTER UPDATE OF content, reasoning ON messages BEGIN
        INSERT INTO messages_fts(messages_fts, rowid, content, reasoning)
            VALUES ('delete', old.id, old.content, old.reasoning);
        INSERT INTO messages_fts(rowid, content, reasoning) VALUES (new.id, new.content, new.reasoning);
    END""",
    "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",
)


# MIGRATIONS[n] moves a database from user_version n to n + 1.
# Each is a tuple of single statements (not executescript, which would commit mid-migration).
MIGRATIONS: list[tuple[str, ...]] = [
    _CORE_TABLES,
    _FULL_TEXT_INDEX,
]
SCHEMA_VERSION = len(MIGRATIONS)


def schema_version(db: sqlite3.Connection) -> int:
    """The database's `user_version`."""
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def migrate(db: sqlite3.Connection, target: int = SCHEMA_VERSION) -> int:
    """Bring `db` up to schema `target`, one transaction per step; return the version reached.

    `db` must be in autocommit mode (isolation_level=None) so each step controls its own transaction.
    """
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise HistoryVersionError(
            f"This chat history uses schema version {version}, written by a newer MoeBar; this version "
            f"understands up to {SCHEMA_VERSION}. Update MoeBar to open it (the file was left untouched).")
    while version < target:
        db.execute("BEGIN IMMEDIATE")
        try:
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = schema_version(db)
            if version >= target:
                db.execute("COMMIT")
                break
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            version += 1
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
    return version
