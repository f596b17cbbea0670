"""History store: conversations, messages, streaming updates, listing, search and Markdown export."""

from __future__ import annotations

import itertools
import threading
from pathlib import Path

import pytest

from app.history import (
    HistoryStore,
    NotFoundError,
    conversation_to_markdown,
)
from app.history import store as store_module


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> itertools.count:
    """A fake clock that ticks one second per call, so ordering by time is deterministic."""
    ticks = itertools.count(1_700_000_000)
    monkeypatch.setattr(store_module, "_now", lambda: float(next(ticks)))
    return ticks


@pytest.fixture
def history(tmp_path: Path) -> HistoryStore:
    store = HistoryStore(tmp_path / "data" / "history.sqlite3")
    yield store
    store.close()


def test_database_is_in_wal_mode_under_given_path(history: HistoryStore, tmp_path: Path) -> None:
    assert history.path == tmp_path / "data" / "history.sqlite3"
    assert history._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert history.path.exists()


def test_message_round_trips_every_field(history: HistoryStore) -> None:
    conversation = history.create_conversation("Reading files", model="qwen3-30b-a3b")
    calls = [{"id": "call_1", "type": "function",
              "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}]
    results = [{"tool_call_id": "call_1", "name": "read_file", "content": "hello", "is_error": False}]
    figures = {"decode_tps": 11.5, "prompt_tps": 80.25, "ttft_s": 0.8, "ssd_mb_s": 900, "cache_hit": 0.71}
    message_id = history.append_message(
        conversation, "assistant", "Here it is.", reasoning="I should read the file.", tool_calls=calls,
        tool_results=results, figures=figures, partial=False)
    message = history.get_message(message_id)
    assert (message.role, message.content, message.reasoning) == ("assistant", "Here it is.", "I should read the file.")
    assert message.tool_calls == calls and message.tool_results == results and message.figures == figures
    assert message.partial is False and message.conversation_id == conversation
    tool_reply = history.append_message(conversation, "tool", "hello", tool_call_id="call_1")
    assert history.get_message(tool_reply).tool_call_id == "call_1"
    assert [m.position for m in history.get_conversation(conversation).messages] == [0, 1]


def test_streaming_answer_stays_partial_until_finished(history: HistoryStore) -> None:
    conversation = history.create_conversation()
    history.append_message(conversation, "user", "Tell me a story")
    answer = history.append_message(conversation, "assistant", partial=True)
    text = ""
    for word in ["Once", " upon", " a", " time"]:
        text += word
        history.update_message(answer, content=text)
        assert history.get_message(answer).partial is True
    history.update_message(answer, figures={"decode_tps": 9.0}, partial=False)
    message = history.get_message(answer)
    assert (message.content, message.partial, message.figures) == ("Once upon a time", False, {"decode_tps": 9.0})


def test_update_keeps_fields_not_given_and_none_clears_tool_calls(history: HistoryStore) -> None:
    conversation = history.create_conversation()
    answer = history.append_message(conversation, "assistant", "text", reasoning="why",
                                    tool_calls=[{"id": "a"}], figures={"x": 1})
    history.update_message(answer, tool_calls=None)
    message = history.get_message(answer)
    assert (message.content, message.reasoning, message.figures, message.tool_calls) == ("text", "why", {"x": 1}, None)


def test_list_is_most_recent_first_and_counts_messages(history: HistoryStore, clock: itertools.count) -> None:
    first = history.create_conversation("first")
    second = history.create_conversation("second")
    third = history.create_conversation("third")
    assert [c.id for c in history.list_conversations()] == [third, second, first]
    history.append_message(first, "user", "bump")
    summaries = history.list_conversations()
    assert [c.id for c in summaries] == [first, third, second]
    assert summaries[0].message_count == 1 and summaries[1].message_count == 0
    assert [c.id for c in history.list_conversations(limit=1, offset=1)] == [third]


def test_streaming_update_moves_conversation_to_top(history: HistoryStore, clock: itertools.count) -> None:
    older = history.create_conversation("older")
    answer = history.append_message(older, "assistant", partial=True)
    newer = history.create_conversation("newer")
    assert history.list_conversations()[0].id == newer
    history.update_message(answer, content="more text")
    assert history.list_conversations()[0].id == older


def test_rename_collapses_whitespace_and_empty_becomes_untitled(history: HistoryStore) -> None:
    conversation = history.create_conversation("  draft  ")
    assert history.get_conversation(conversation).title == "draft"
    history.rename_conversation(conversation, "Trip\nplanning\t 2025")
    assert history.get_conversation(conversation).title == "Trip planning 2025"
    history.rename_conversation(conversation, "   ")
    assert history.get_conversation(conversation).title == "Untitled"


def test_delete_conversation_removes_messages_and_search_entries(history: HistoryStore) -> None:
    keep = history.create_conversation("keep")
    gone = history.create_conversation("gone")
    history.append_message(keep, "user", "zebra in keep")
    doomed = history.append_message(gone, "user", "zebra in gone")
    history.delete_conversation(gone)
    assert [c.id for c in history.list_conversations()] == [keep]
    assert [hit.conversation_id for hit in history.search("zebra")] == [keep]
    with pytest.raises(NotFoundError):
        history.get_message(doomed)


def test_delete_message_then_append_continues_positions(history: HistoryStore) -> None:
    conversation = history.create_conversation()
    history.append_message(conversation, "user", "q")
    answer = history.append_message(conversation, "assistant", "bad answer")
    history.delete_message(answer)
    history.append_message(conversation, "assistant", "better answer")
    messages = history.get_conversation(conversation).messages
    assert [(m.position, m.content) for m in messages] == [(0, "q"), (1, "better answer")]


@pytest.mark.parametrize("call", [
    lambda h: h.get_conversation(999), lambda h: h.get_message(999), lambda h: h.rename_conversation(999, "x"),
    lambda h: h.delete_conversation(999), lambda h: h.delete_message(999),
    lambda h: h.append_message(999, "user", "x"), lambda h: h.update_message(999, content="x"),
    lambda h: h.export_markdown(999),
])
def test_unknown_ids_raise_not_found(history: HistoryStore, call) -> None:
    with pytest.raises(NotFoundError, match="No (conversation|message) with id 999"):
        call(history)


def test_bad_role_and_unserializable_json_are_refused_before_writing(history: HistoryStore) -> None:
    conversation = history.create_conversation()
    with pytest.raises(ValueError, match="role must be one of"):
        history.append_message(conversation, "robot", "hi")
    with pytest.raises(ValueError, match="figures must be JSON-serializable"):
        history.append_message(conversation, "assistant", "hi", figures={"when": object()})
    assert history.get_conversation(conversation).messages == []


def test_search_finds_all_words_with_prefix_and_diacritics(history: HistoryStore) -> None:
    coffee = history.create_conversation("coffee")
    tea = history.create_conversation("tea")
    history.append_message(coffee, "user", "Where is the best café in Zürich?")
    history.append_message(tea, "user", "Green tea brewing temperature")
    history.append_message(tea, "assistant", "About 80 °C", reasoning="The user asks about temperature for green tea")
    assert [h.conversation_id for h in history.search("cafe zurich")] == [coffee]
    assert [h.conversation_id for h in history.search("ZÜR")] == [coffee]  # prefix, case and accents folded
    assert [h.conversation_id for h in history.search("green temp")] == [tea]  # one hit per conversation
    assert history.search("cafe tea") == []  # every word must appear in the same message


def test_search_highlights_mark_the_matching_words(history: HistoryStore) -> None:
    conversation = history.create_conversation("t")
    history.append_message(conversation, "assistant", "The expert cache hit rate was 71 percent today.")
    [hit] = history.search("cache rate")
    assert hit.role == "assistant"
    assert [hit.snippet[a:b] for a, b in hit.highlights] == ["cache", "rate"]
    assert "\ue000" not in hit.snippet and "\ue001" not in hit.snippet


def test_search_follows_streaming_updates(history: HistoryStore) -> None:
    conversation = history.create_conversation()
    answer = history.append_message(conversation, "assistant", "draft about apples", partial=True)
    history.update_message(answer, content="final about oranges", partial=False)
    assert history.search("apples") == []
    assert [h.message_id for h in history.search("oranges")] == [answer]


# (query, whether it matches "and or not near col value start drop table"): FTS5 operators and
# punctuation are plain words or separators, so a query matches exactly when all its words appear.
ODD_QUERIES = [
    ("", False), ("   ", False), ('"', False), ('"unbalanced', False), ("AND", True), ("OR NOT", True),
    ("a AND (b", False), ("NEAR(a b)", False), ("*", False), ("col:value", True), ("-x", False),
    ("^start", True), ("'; DROP TABLE messages; --", False), ("'; DROP TABLE --", True), ("\x00", False),
    ("\u202e", False), ("😀", False), ("a" * 5000, False), ("TABLE drop", True),
]


@pytest.mark.parametrize("query,matches", ODD_QUERIES, ids=[repr(q[:20]) for q, _ in ODD_QUERIES])
def test_search_treats_odd_input_as_plain_words(history: HistoryStore, query: str, matches: bool) -> None:
    conversation = history.create_conversation()
    message = history.append_message(conversation, "user", "and or not near col value start drop table")
    hits = history.search(query)
    assert [h.message_id for h in hits] == ([message] if matches else [])
    assert history.list_conversations()  # tables still there
    assert history.get_message(message).content == "and or not near col value start drop table"


def test_search_limit_and_ranking(history: HistoryStore) -> None:
    ids = [history.create_conversation(f"c{i}") for i in range(5)]
    for index, conversation in enumerate(ids):
        history.append_message(conversation, "user", "quasar " * (index + 1) + "filler " * 40)
    hits = history.search("quasar", limit=3)
    assert len(hits) == 3
    assert hits[0].conversation_id == ids[-1]  # bm25: the most mentions ranks first


def test_concurrent_appends_from_threads_keep_positions_unique(history: HistoryStore) -> None:
    conversation = history.create_conversation()

    def writer(name: str) -> None:
        for index in range(25):
            history.append_message(conversation, "user", f"{name} {index}")

    threads = [threading.Thread(target=writer, args=(f"t{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    positions = [m.position for m in history.get_conversation(conversation).messages]
    assert positions == list(range(100))


def test_two_stores_on_one_file_see_each_others_writes(tmp_path: Path) -> None:
    path = tmp_path / "shared.sqlite3"
    with HistoryStore(path) as first, HistoryStore(path) as second:
        conversation = first.create_conversation("shared")
        second.append_message(conversation, "user", "from second")
        first.append_message(conversation, "assistant", "from first")
        assert [m.content for m in second.get_conversation(conversation).messages] == ["from second", "from first"]


def test_export_markdown_includes_everything(history: HistoryStore) -> None:
    conversation = history.create_conversation("Files & figures", model="qwen3")
    history.append_message(conversation, "user", "Read notes.txt")
    history.append_message(
        conversation, "assistant", "", reasoning="Need the file.",
        tool_calls=[{"id": "call_7", "type": "function",
                     "function": {"name": "read_file", "arguments": '{"path": "notes.txt"}'}}])
    history.append_message(conversation, "tool", "line one\n```inner fence```", tool_call_id="call_7")
    history.append_message(conversation, "assistant", "It says *line one*.", figures={"decode_tps": 12.3456},
                           tool_results=[{"name": "read_file", "content": "oops", "is_error": True}], partial=True)
    markdown = history.export_markdown(conversation)
    assert markdown.startswith("# Files & figures\n\n*Model: qwen3 · Created ")
    for expected in ["## User\n\nRead notes.txt", "<details><summary>Reasoning</summary>\n\nNeed the file.",
                     "**Tool call:** `read_file` (`call_7`)", '"path": "notes.txt"',
                     "**Tool output for call `call_7`:**\n\n````\nline one\n```inner fence```\n````",
                     "It says *line one*.", "**Tool error:** `read_file`", "decode_tps: 12.3",
                     "*(This answer is incomplete: it was stopped or interrupted.)*"]:
        assert expected in markdown, expected
    assert markdown.endswith("\n") and not markdown.endswith("\n\n")
    assert markdown == conversation_to_markdown(history.get_conversation(conversation))


def test_export_shows_invalid_tool_arguments_verbatim(history: HistoryStore) -> None:
    conversation = history.create_conversation("bad args")
    history.append_message(conversation, "assistant", tool_calls=[
        {"function": {"name": "search_text", "arguments": "{not json"}}])
    assert "```json\n{not json\n```" in history.export_markdown(conversation)


def test_one_busy_conversation_does_not_crowd_others_out_of_search(history: HistoryStore) -> None:
    busy = history.create_conversation("busy")
    for _ in range(60):
        history.append_message(busy, "user", "walrus walrus walrus")
    quiet = history.create_conversation("quiet")
    history.append_message(quiet, "user", "one walrus among many other words " + "filler " * 50)
    assert [hit.conversation_id for hit in history.search("walrus", limit=2)] == [busy, quiet]


def test_export_tolerates_unexpected_tool_call_shapes(history: HistoryStore) -> None:
    conversation = history.create_conversation("odd")
    history.append_message(conversation, "assistant", tool_calls=["just text", 5], tool_results=[None])  # type: ignore[list-item]
    markdown = history.export_markdown(conversation)
    assert '"just text"' in markdown and "**Tool result:**\n\n```\nnull\n```" in markdown
