"""History reliability: a killed writer leaves a readable database; damage is moved aside, never replaced."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app.history import (
    SCHEMA_VERSION,
    HistoryCorruptError,
    HistoryError,
    HistoryStore,
    HistoryVersionError,
    open_history,
)
from app.history.schema import migrate, schema_version

REPO_ROOT = Path(__file__).resolve().parents[2]

# Writes deterministic messages forever, printing how many are committed after each commit.
WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from app.history import HistoryStore
    store = HistoryStore(Path(sys.argv[1]))
    conversation = store.create_conversation("crash test")
    index = 0
    while True:
        answer = store.append_message(conversation, "assistant", "", partial=True)
        text = ""
        for chunk in range(8):
            text += f"message {index} chunk {chunk} " + "lorem ipsum " * 200
            store.update_message(answer, content=text, figures={"chunk": chunk})
        store.update_message(answer, partial=False)
        index += 1
        print(index, flush=True)
""")


def _expected_text(index: int, chunks: int) -> str:
    return "".join(f"message {index} chunk {chunk} " + "lorem ipsum " * 200 for chunk in range(chunks))


@pytest.mark.parametrize("kill_after_messages", [1, 4, 12])
def test_sigkill_during_writes_leaves_a_readable_consistent_database(tmp_path: Path, kill_after_messages: int) -> None:
    path = tmp_path / "history.sqlite3"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True, env=env)
    assert writer.stdout is not None
    committed = 0
    try:
        while committed < kill_after_messages:
            line = writer.stdout.readline()
            assert line, "writer exited early"
            committed = int(line)
        time.sleep(0.003 * kill_after_messages)  # land the kill at a different point of the next message
        writer.send_signal(signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(10)
    assert writer.returncode == -signal.SIGKILL

    with HistoryStore(path) as store:  # would raise HistoryCorruptError if the file were damaged
        assert store._db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        store._db.execute("INSERT INTO messages_fts(messages_fts) VALUES ('integrity-check')")
        [summary] = store.list_conversations()
        messages = store.get_conversation(summary.id).messages
        finished = [m for m in messages if not m.partial]
        assert len(finished) >= committed
        for index, message in enumerate(finished):
            assert message.content == _expected_text(index, 8)
        for message in messages[len(finished):]:  # at most the one being written when killed
            assert message.partial
            chunks = message.figures.get("chunk", -1) + 1
            assert message.content == _expected_text(len(finished), chunks)
        assert len(messages) - len(finished) <= 1
        assert store.search(f"message {committed - 1} chunk 7")


def test_garbage_file_is_moved_aside_with_message_and_never_replaced(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    garbage = os.urandom(3000) + b"this is not sqlite"
    path.write_bytes(garbage)
    with pytest.raises(HistoryCorruptError) as caught:
        HistoryStore(path)
    error = caught.value
    assert error.path == path
    assert error.moved_to.name.startswith("history.sqlite3.corrupt-")
    assert error.moved_to.read_bytes() == garbage
    assert not path.exists()
    message = str(error)
    assert "damaged" in message and str(error.moved_to) in message and "new, empty history" in message
    with HistoryStore(path) as fresh:
        assert fresh.list_conversations() == []
    assert error.moved_to.read_bytes() == garbage  # the fresh database did not touch the damaged copy


def test_damaged_pages_inside_a_valid_database_are_detected(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path) as store:
        conversation = store.create_conversation("will be damaged")
        for index in range(200):
            store.append_message(conversation, "user", f"message {index} " + "x" * 500)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    data = bytearray(path.read_bytes())
    page_size = 4096
    assert len(data) > 10 * page_size
    for page in range(2, len(data) // page_size, 3):  # keep the header page, smash every third page after it
        data[page * page_size: page * page_size + 100] = b"\xa5" * 100
    path.write_bytes(bytes(data))
    store, message = open_history(path)
    try:
        assert message is not None and "damaged" in message
        assert store.list_conversations() == []
        assert len(list(tmp_path.glob("history.sqlite3.corrupt-*"))) == 1
    finally:
        store.close()


def test_wal_and_shm_files_move_with_the_damaged_database(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"\x00" * 100 + b"garbage" * 200)
    path.with_name("history.sqlite3-wal").write_bytes(b"wal bytes")
    with pytest.raises(HistoryCorruptError) as caught:
        HistoryStore(path)
    moved = caught.value.moved_to
    assert moved.with_name(moved.name + "-wal").read_bytes() == b"wal bytes"
    assert not path.with_name("history.sqlite3-wal").exists()


def test_two_damaged_files_in_the_same_second_get_distinct_names(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    moved = []
    for round_ in range(2):
        path.write_bytes(f"garbage {round_} ".encode() * 300)
        with pytest.raises(HistoryCorruptError) as caught:
            HistoryStore(path)
        moved.append(caught.value.moved_to)
    assert moved[0] != moved[1]
    assert moved[0].read_bytes() != moved[1].read_bytes()


def test_open_history_on_sound_file_returns_no_message(tmp_path: Path) -> None:
    store, message = open_history(tmp_path / "h.sqlite3")
    store.close()
    assert message is None


def test_empty_file_is_a_new_database_not_damage(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.touch()
    with HistoryStore(path) as store:
        assert store.list_conversations() == []
    assert not list(tmp_path.glob("*.corrupt-*"))


def test_cannot_open_error_is_reported_and_nothing_is_moved(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    path.mkdir()  # a folder where the database should be
    with pytest.raises(HistoryError, match="Could not open the chat history") as caught:
        HistoryStore(path)
    assert not isinstance(caught.value, HistoryCorruptError)
    assert path.is_dir() and not list(tmp_path.glob("*.corrupt-*"))


def test_database_from_newer_app_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    with HistoryStore(path):
        pass
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    db.commit()
    db.close()
    before = path.read_bytes()
    with pytest.raises(HistoryVersionError, match="newer MoeBar"):
        HistoryStore(path)
    assert path.read_bytes() == before and not list(tmp_path.glob("*.corrupt-*"))


def test_migration_from_version_1_backfills_the_search_index(tmp_path: Path) -> None:
    path = tmp_path / "history.sqlite3"
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, target=1) == 1
    db.execute("INSERT INTO conversations (id, title, created_at, updated_at) VALUES (1, 'old chat', 1, 1)")
    db.execute("INSERT INTO messages (conversation_id, position, role, content, created_at, updated_at) "
               "VALUES (1, 0, 'user', 'an old message about lighthouses', 1, 1)")
    db.close()
    with HistoryStore(path) as store:
        assert schema_version(store._db) == SCHEMA_VERSION
        assert [hit.conversation_id for hit in store.search("lighthouse")] == [1]
        assert store.get_conversation(1).messages[0].figures == {}


def test_failed_migration_step_rolls_back_and_keeps_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.history import schema

    db = sqlite3.connect(tmp_path / "h.sqlite3", isolation_level=None)
    migrate(db, target=1)
    monkeypatch.setattr(schema, "MIGRATIONS", [schema.MIGRATIONS[0], ("CREATE TABLE half_done (x)", "BROKEN SQL")])
    with pytest.raises(sqlite3.OperationalError):
        migrate(db, target=2)
    assert schema_version(db) == 1
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    db.close()


def test_damaged_file_that_cannot_be_moved_gives_a_clear_error(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from app.history import store as store_module

    path = tmp_path / "history.sqlite3"
    path.write_bytes(b"garbage" * 100)

    def refuse(src: object, dst: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(store_module.os, "replace", refuse)
    with pytest.raises(HistoryError, match="could not be moved aside \\(Permission denied\\)") as caught:
        HistoryStore(path)
    assert not isinstance(caught.value, HistoryCorruptError)
    monkeypatch.undo()
    assert path.read_bytes() == b"garbage" * 100
