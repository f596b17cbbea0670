"""The conversation logic behind the chat window: requests, streaming, tools, history.

No widgets here: the window connects its views to these signals, and tests drive the
controller directly. Everything runs in the GUI thread; tools run in background ops.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

from app import bridge as engine_state
from app.bridge import EngineBridge
from app.history import HistoryError, HistoryStore
from app.mcp.tools import McpTools
from app.ops import BackgroundOp, OpContext
from app.qt import QObject, Signal, Slot
from app.settings import SettingsStore
from app.throttle import Throttle
from app.tools import DroppedFiles, ToolError, ToolRegistry
from app.ui import history_sync
from app.ui.conversation import Attachment, ChatEntry, ToolState, request_messages, tool_result_for
from app.ui.format import prefill_note
from engine.serving.protocol import ChatRequest, DoneEvent, ErrorEvent, LoadedEvent, PrefillEvent, ToolCall, ToolCallEvent
from engine.types import SamplingParams

log = logging.getLogger(__name__)

DENIED_RESULT = "The user denied this tool call."
STREAM_SAVE_MS = 1000  # the streaming answer is written to history at most once a second
TITLE_CHARS = 60


@dataclass
class ActiveRequest:
    """The chat request being answered and the entry its tokens go into."""

    request_id: str
    entry: ChatEntry
    pending_calls: list[ToolCall] = field(default_factory=list)
    prefill_shown: bool = False  # the entry's note shows the prompt's prefill progress


class ChatController(QObject):
    """Owns the entries of the open conversation and keeps window, engine and history in step."""

    entries_reset = Signal()  # another conversation is open: show `entries` anew
    entry_added = Signal(object)  # ChatEntry
    entry_grew = Signal(int)  # key: streamed text arrived (repaint throttled)
    entry_updated = Signal(int)  # key: state, figures or note changed (repaint now)
    entry_removed = Signal(int)
    tool_state_changed = Signal(str, str, str)  # call id, state, result text
    busy_changed = Signal(bool)
    notice = Signal(str, str)  # level ("info", "warning", "error"), text
    conversation_opened = Signal(int)  # conversation id, or 0 for a new unsaved chat
    history_changed = Signal()  # the conversation list changed (title, new, deleted)

    def __init__(
        self,
        bridge: EngineBridge,
        settings: SettingsStore,
        history: HistoryStore | None,
        dropped: DroppedFiles,
        parent: QObject | None = None,
        mcp_tools: McpTools | None = None,
    ) -> None:
        super().__init__(parent)
        self.mcp_tools = mcp_tools  # tools of the user's MCP servers, offered beside the built-in ones
        self.bridge = bridge
        self.settings = settings
        self.history = history
        self.dropped = dropped
        self.tools = ToolRegistry(dropped)
        self.entries: list[ChatEntry] = []
        self.conversation_id: int | None = None
        self.model: LoadedEvent | None = bridge.model
        self._active: ActiveRequest | None = None
        self._awaiting: ChatEntry | None = None  # assistant entry whose tool calls wait for results
        self._queued = False  # a message waits for the model to be ready (sent then, never failed)
        self.answer_token_cap: int | None = None  # a shorter longest answer (the demo model's gibberish)
        self._tool_ops: dict[str, BackgroundOp[str]] = {}
        self._save_throttle = Throttle(self._save_streaming, STREAM_SAVE_MS, self)
        bridge.token.connect(self._on_token)
        bridge.prefill.connect(self._on_prefill)
        bridge.tool_call.connect(self._on_tool_call)
        bridge.done.connect(self._on_done)
        bridge.error.connect(self._on_error)
        bridge.engine_lost.connect(self._on_engine_lost)
        bridge.loaded.connect(self._on_loaded)
        bridge.state_changed.connect(self._on_engine_state)

    # ------------------------------------------------------------ state

    def is_busy(self) -> bool:
        """Whether an answer is streaming or tool calls wait for approval or results."""
        return self._active is not None or self._awaiting is not None or self._queued

    def is_waiting_for_model(self) -> bool:
        """Whether a sent message waits for the model to be ready."""
        return self._queued

    def entry(self, key: int) -> ChatEntry | None:
        """The entry with `key`."""
        return next((e for e in self.entries if e.key == key), None)

    def awaiting_calls(self) -> list[ToolCall]:
        """Tool calls that still need the user's decision or a result."""
        if self._awaiting is None:
            return []
        return [c for c in self._awaiting.tool_calls if tool_result_for(self.entries, c.id) is None]

    # ------------------------------------------------------------ user actions

    def send(self, text: str, attachments: list[Attachment] | None = None) -> bool:
        """Add a user message and ask for an answer; False (with a notice) if that cannot be done now."""
        text = text.strip()
        if not text:
            return False
        if self.is_busy():
            self.notice.emit("warning", "Wait for the current answer, or press Stop.")
            return False
        entry = ChatEntry(role="user", content=text, attachments=list(attachments or []))
        self._add(entry)
        self._answer_when_ready()
        return True

    def stop(self) -> None:
        """Stop the answer (it is kept, marked stopped) and deny tool calls still waiting."""
        if self._queued:
            self._queued = False
            self.notice.emit("info", "Stopped waiting: your message stays in the chat; edit and resend it when the model is ready.")
            self._set_busy()
        if self._active is not None:
            self.bridge.cancel(self._active.request_id)
        if self._awaiting is not None:
            for op in self._tool_ops.values():
                op.cancel()
            for call in self.awaiting_calls():
                self._finish_tool(call, "denied", DENIED_RESULT, continue_answer=False)
            self._awaiting = None
            self._set_busy()

    def regenerate(self, key: int) -> None:
        """Replace the answer that `key` belongs to (and any later turns) with a new one."""
        if self.is_busy():
            return
        index = self._index(key)
        if index is None:
            return
        user_index = index
        while user_index >= 0 and self.entries[user_index].role != "user":
            user_index -= 1
        if user_index < 0:
            return
        self._truncate_after(user_index)
        self._answer_when_ready()

    def edit_and_resend(self, key: int, text: str) -> None:
        """Change a user message, drop everything after it and ask again."""
        index = self._index(key)
        if index is None or self.is_busy() or not text.strip():
            return
        entry = self.entries[index]
        entry.content = text.strip()
        self._store_update(entry)
        self.entry_updated.emit(entry.key)
        self._truncate_after(index)
        self._answer_when_ready()

    def delete_entry(self, key: int) -> None:
        """Delete a message; an assistant message takes its tool results with it."""
        index = self._index(key)
        if index is None or (self._active is not None and self._active.entry.key == key):
            return
        doomed = [self.entries[index]]
        if doomed[0].role == "assistant":
            ids = {c.id for c in doomed[0].tool_calls}
            doomed += [e for e in self.entries if e.role == "tool" and e.tool_call_id in ids]
            if self._awaiting is doomed[0]:
                self._awaiting = None
                self._set_busy()
        for entry in doomed:
            self._remove(entry)

    def approve_tool(self, call_id: str, always: bool = False) -> None:
        """Run a waiting tool call (and, with `always`, every later call of that tool)."""
        call = self._awaiting_call(call_id)
        if call is None:
            return
        if always:
            approved = set(self.settings.get("always_approved_tools")) | {call.name}
            self.settings.set("always_approved_tools", sorted(approved))
        self._run_tool(call)

    def deny_tool(self, call_id: str) -> None:
        """Answer a waiting tool call with a refusal."""
        call = self._awaiting_call(call_id)
        if call is not None:
            self._finish_tool(call, "denied", DENIED_RESULT)

    # ------------------------------------------------------------ conversations

    def new_conversation(self) -> None:
        """Start an empty chat (saved on its first message)."""
        if self.is_busy():
            self.stop()
        self.entries = []
        self.conversation_id = None
        self.dropped.clear()
        self.entries_reset.emit()
        self.conversation_opened.emit(0)

    def open_conversation(self, conversation_id: int) -> None:
        """Show a stored conversation."""
        if self.history is None or conversation_id == self.conversation_id:
            return
        if self.is_busy():
            self.stop()
        try:
            entries = history_sync.load_entries(self.history, conversation_id)
        except HistoryError as exc:
            self.notice.emit("error", str(exc))
            return
        self.entries = entries
        self.conversation_id = conversation_id
        self.dropped.clear()
        self.entries_reset.emit()
        self.conversation_opened.emit(conversation_id)

    # ------------------------------------------------------------ engine events

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        self.model = event

    @Slot(object)
    def _on_prefill(self, event: PrefillEvent) -> None:
        """Show how far the prompt has been read until the first words arrive."""
        active = self._active
        if active is None or active.request_id != event.id:
            return
        entry = active.entry
        if entry.content or entry.reasoning:
            return
        entry.note = prefill_note(event)
        active.prefill_shown = True
        self.entry_updated.emit(entry.key)

    @Slot(str, str, str)
    def _on_token(self, request_id: str, text: str, kind: str) -> None:
        active = self._active
        if active is None or active.request_id != request_id:
            return
        if active.prefill_shown:  # the prompt is read: its progress note goes
            active.prefill_shown = False
            active.entry.note = ""
            self.entry_updated.emit(active.entry.key)
        if kind == "reasoning":
            active.entry.reasoning += text
        else:
            active.entry.content += text
        self.entry_grew.emit(active.entry.key)
        self._save_throttle()

    @Slot(object)
    def _on_tool_call(self, event: ToolCallEvent) -> None:
        active = self._active
        if active is None or active.request_id != event.id:
            return
        call = ToolCall(id=event.call_id, name=event.name, arguments=dict(event.arguments))
        active.entry.tool_calls.append(call)
        active.pending_calls.append(call)
        self.entry_updated.emit(active.entry.key)

    @Slot(object)
    def _on_done(self, event: DoneEvent) -> None:
        active = self._active
        if active is None or active.request_id != event.id:
            return
        self._active = None
        self._save_throttle.cancel()
        entry = active.entry
        entry.figures = event.figures
        if event.finish_reason == "cancelled":
            entry.status, entry.note = "stopped", "you pressed Stop"
        elif event.finish_reason == "error":
            entry.status = "error"
            entry.note = entry.note or "the engine reported an error"
        elif event.finish_reason == "length":
            entry.status, entry.note = "complete", "reached the answer length limit"
        else:
            entry.status = "complete"
        self._store_update(entry)
        self.entry_updated.emit(entry.key)
        if entry.status == "complete" and active.pending_calls:
            self._awaiting = entry
            for call in active.pending_calls:
                if call.name in self.settings.get("always_approved_tools"):
                    self._run_tool(call)
        self._set_busy()

    @Slot(object)
    def _on_error(self, event: ErrorEvent) -> None:
        active = self._active
        if active is not None and event.id == active.request_id:
            active.entry.note = event.message
            self.entry_updated.emit(active.entry.key)
        elif event.id is None or active is None:
            self.notice.emit("error", event.message)

    @Slot(str, object)
    def _on_engine_lost(self, reason: str, request_ids: list[str]) -> None:
        active = self._active
        if active is None or active.request_id not in request_ids:
            self.notice.emit("warning", f"{reason} Restarting it…")
            return
        self._active = None
        self._save_throttle.cancel()
        entry = active.entry
        entry.status = "interrupted"
        entry.note = reason
        entry.tool_calls = [c for c in entry.tool_calls if c not in active.pending_calls]
        self._store_update(entry)
        self.entry_updated.emit(entry.key)
        self.notice.emit(
            "warning", f"{reason} The answer so far is kept. Restarting the engine and reloading the model…"
        )
        self._set_busy()

    # ------------------------------------------------------------ requests

    def _answer_when_ready(self) -> None:
        """Ask for an answer now, or as soon as the model is ready (saying so), never a false failure."""
        if self.bridge.is_ready():
            self._request_answer()
            return
        self._queued = True
        self._set_busy()
        self.notice.emit("info", self._waiting_text(self.bridge.state))

    def _waiting_text(self, state: str) -> str:
        if state == engine_state.BUSY:
            return "The model is answering elsewhere (Quick Ask); your message is sent when it is done."
        if state == engine_state.FAILED:
            return "The engine stopped; your message is sent once it is restarted and the model is loaded."
        if state in (engine_state.IDLE, engine_state.STOPPED) and self.bridge.model is None:
            return "No model is loaded yet; your message is sent as soon as one is (choose one with Model…)."
        return "The model is still loading; your message is sent as soon as it is ready."

    @Slot(str)
    def _on_engine_state(self, state: str) -> None:
        if self._queued and state == engine_state.READY:
            self._queued = False
            self._request_answer()

    def _request_answer(self) -> None:
        entry = ChatEntry(role="assistant", status="streaming")
        self._add(entry)
        request = ChatRequest(
            id=uuid.uuid4().hex,
            messages=request_messages(self._system_prompt(), self.entries[:-1]),
            tools=self._tool_schemas() if self._offer_tools() else [],
            sampling=self._sampling(),
            thinking=bool(self.settings.get("thinking")) if self.model and self.model.supports_thinking else None,
        )
        self._active = ActiveRequest(request.id, entry)
        self._set_busy()
        self.bridge.chat(request)

    def _system_prompt(self) -> str:
        parts = [str(self.settings.get("system_prompt")).strip()]
        if len(self.dropped):
            parts.append(self.dropped.describe_for_model())
        return "\n\n".join(p for p in parts if p)

    def _offer_tools(self) -> bool:
        # Tool schemas cost prompt tokens, and prefill of a streamed model is slow: offer the file
        # tools only when there is something for them to open (MCP tools whenever the user enabled some).
        supports = self.model is None or self.model.supports_tools
        return supports and (len(self.dropped) > 0 or bool(self.mcp_tools and self.mcp_tools.offered()))

    def _tool_schemas(self) -> list[dict[str, object]]:
        schemas = self.tools.schemas() if len(self.dropped) > 0 else []
        return schemas + (self.mcp_tools.schemas() if self.mcp_tools is not None else [])

    def _sampling(self) -> SamplingParams:
        s = self.settings.settings
        limit = min(s.max_tokens, self.answer_token_cap) if self.answer_token_cap else s.max_tokens
        return SamplingParams(temperature=s.temperature, top_p=s.top_p, max_tokens=limit)

    # ------------------------------------------------------------ tools

    def _awaiting_call(self, call_id: str) -> ToolCall | None:
        return next((c for c in self.awaiting_calls() if c.id == call_id), None)

    def _run_tool(self, call: ToolCall) -> None:
        if call.id in self._tool_ops:
            return
        self.tool_state_changed.emit(call.id, "running", "")

        def work(ctx: OpContext) -> str:
            if self.mcp_tools is not None and self.mcp_tools.owns(call.name):
                return self.mcp_tools.run(call.name, call.arguments, lambda: ctx.cancelled)
            return self.tools.run(call.name, call.arguments)

        def failed(error: BaseException) -> None:
            self._tool_ops.pop(call.id, None)
            message = str(error) if isinstance(error, ToolError) else f"{type(error).__name__}: {error}"
            if not isinstance(error, ToolError):
                log.error("tool %s crashed", call.name, exc_info=(type(error), error, error.__traceback__))
            self._finish_tool(call, "error", f"Error: {message}")

        def succeeded(result: str) -> None:
            self._tool_ops.pop(call.id, None)
            self._finish_tool(call, "done", result)

        self._tool_ops[call.id] = BackgroundOp(self, work, succeeded, failed).run()

    def _finish_tool(self, call: ToolCall, state: ToolState, result: str, continue_answer: bool = True) -> None:
        entry = ChatEntry(role="tool", content=result, tool_call_id=call.id, name=call.name, tool_state=state)
        self._add(entry)
        self.tool_state_changed.emit(call.id, state, result)
        if continue_answer and self._awaiting is not None and not self.awaiting_calls():
            self._awaiting = None
            self._request_answer()  # the answer continues with the results

    # ------------------------------------------------------------ entries and history

    def _index(self, key: int) -> int | None:
        return next((i for i, e in enumerate(self.entries) if e.key == key), None)

    def _add(self, entry: ChatEntry) -> None:
        self.entries.append(entry)
        self.entry_added.emit(entry)
        if self.history is None:
            return
        try:
            if self.conversation_id is None:
                title = entry.content.strip().splitlines()[0][:TITLE_CHARS] if entry.content.strip() else "New chat"
                model = self.model.name if self.model else ""
                self.conversation_id = self.history.create_conversation(title, model)
                self.conversation_opened.emit(self.conversation_id)
                self.history_changed.emit()
            history_sync.append_entry(self.history, self.conversation_id, entry)
        except HistoryError as exc:
            self.notice.emit("error", f"Could not save to history: {exc}")

    def _remove(self, entry: ChatEntry) -> None:
        if entry in self.entries:
            self.entries.remove(entry)
        self.entry_removed.emit(entry.key)
        if self.history is not None and entry.stored_id is not None:
            try:
                self.history.delete_message(entry.stored_id)
            except HistoryError as exc:
                self.notice.emit("error", f"Could not delete from history: {exc}")

    def _truncate_after(self, index: int) -> None:
        # Later turns built on the answer being replaced, so they go with it.
        for entry in list(self.entries[index + 1:]):
            self._remove(entry)

    def _store_update(self, entry: ChatEntry) -> None:
        if self.history is None:
            return
        try:
            history_sync.update_entry(self.history, entry)
        except HistoryError as exc:
            self.notice.emit("error", f"Could not save to history: {exc}")

    @Slot()
    def _save_streaming(self) -> None:
        if self._active is not None:
            self._store_update(self._active.entry)

    def _set_busy(self) -> None:
        self.busy_changed.emit(self.is_busy())
