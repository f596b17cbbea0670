"""Mapping between the window's ChatEntry and the history store's Message rows.

The store has no columns for attachments or for why an answer is incomplete, so both travel
in the message's `figures` object under the keys below (the Markdown export shows them).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from app.history import HistoryStore, Message
from app.ui.conversation import Attachment, ChatEntry, EntryStatus, ToolState
from engine.serving.protocol import MessageFigures, ToolCall

STATUS_KEY = "status"  # "stopped", "interrupted" or "error" for an incomplete answer
NOTE_KEY = "note"  # the reason shown beside that status
ATTACHMENTS_KEY = "attached"  # [{"path", "name", "size", "folder"}] on user messages
TOOL_STATE_KEY = "tool_state"  # tool messages: "done", "error" or "denied"

_FIGURE_FIELDS = {f.name for f in dataclasses.fields(MessageFigures)}


def entry_fields(entry: ChatEntry) -> dict[str, Any]:
    """The store fields (content, reasoning, tool_calls, figures, partial) of `entry`."""
    figures: dict[str, Any] = dataclasses.asdict(entry.figures) if entry.figures else {}
    if entry.is_incomplete():
        figures[STATUS_KEY] = entry.status
        if entry.note:
            figures[NOTE_KEY] = entry.note
    if entry.attachments:
        figures[ATTACHMENTS_KEY] = [
            {"path": a.path, "name": a.name, "size": a.size, "folder": a.is_folder} for a in entry.attachments
        ]
    if entry.role == "tool":
        figures[TOOL_STATE_KEY] = entry.tool_state
    tool_calls = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in entry.tool_calls] or None
    return {
        "content": entry.content,
        "reasoning": entry.reasoning,
        "tool_calls": tool_calls,
        "figures": figures,
        "partial": entry.status != "complete",
    }


def append_entry(store: HistoryStore, conversation_id: int, entry: ChatEntry) -> None:
    """Save `entry` at the end of the conversation and remember its row id."""
    fields = entry_fields(entry)
    entry.stored_id = store.append_message(
        conversation_id,
        entry.role,
        fields["content"],
        reasoning=fields["reasoning"],
        tool_calls=fields["tool_calls"],
        tool_call_id=entry.tool_call_id,
        figures=fields["figures"],
        partial=fields["partial"],
    )


def update_entry(store: HistoryStore, entry: ChatEntry) -> None:
    """Write the entry's current text, state and figures to its row."""
    if entry.stored_id is None:
        return
    fields = entry_fields(entry)
    store.update_message(
        entry.stored_id,
        content=fields["content"],
        reasoning=fields["reasoning"],
        tool_calls=fields["tool_calls"],
        figures=fields["figures"],
        partial=fields["partial"],
    )


def entry_from_message(message: Message, tool_names: dict[str, str]) -> ChatEntry:
    """Rebuild a ChatEntry from a stored message; `tool_names` maps call ids to tool names."""
    figures = dict(message.figures or {})
    status: EntryStatus = "complete"
    stored_status = figures.pop(STATUS_KEY, None)
    if stored_status in ("stopped", "interrupted", "error"):
        status = stored_status
    elif message.partial:
        status = "interrupted"  # the app itself ended while this answer streamed
    note = str(figures.pop(NOTE_KEY, "")) or ("the app closed before the answer ended" if
                                               message.partial and stored_status is None else "")
    attachments = [
        Attachment(path=str(a.get("path", "")), name=str(a.get("name", "")), size=int(a.get("size", 0)),
                   is_folder=bool(a.get("folder", False)))
        for a in figures.pop(ATTACHMENTS_KEY, []) or []
        if isinstance(a, dict)
    ]
    tool_state: ToolState = "done"
    stored_tool_state = figures.pop(TOOL_STATE_KEY, "done")
    if stored_tool_state in ("done", "error", "denied"):
        tool_state = stored_tool_state
    known = {k: v for k, v in figures.items() if k in _FIGURE_FIELDS}
    calls = [
        ToolCall(id=str(c.get("id", "")), name=str(c.get("name", "")), arguments=dict(c.get("arguments") or {}))
        for c in message.tool_calls or []
        if isinstance(c, dict)
    ]
    return ChatEntry(
        role=message.role,
        content=message.content,
        reasoning=message.reasoning,
        tool_calls=calls,
        tool_call_id=message.tool_call_id,
        name=tool_names.get(message.tool_call_id or ""),
        tool_state=tool_state,
        attachments=attachments,
        figures=MessageFigures(**known) if known else None,
        status=status,
        note=note,
        stored_id=message.id,
    )


def load_entries(store: HistoryStore, conversation_id: int) -> list[ChatEntry]:
    """All entries of a stored conversation, in order (system messages are left out)."""
    conversation = store.get_conversation(conversation_id)
    tool_names: dict[str, str] = {}
    for message in conversation.messages:
        for call in message.tool_calls or []:
            if isinstance(call, dict) and "id" in call:
                tool_names[str(call["id"])] = str(call.get("name", ""))
    return [entry_from_message(m, tool_names) for m in conversation.messages if m.role != "system"]

