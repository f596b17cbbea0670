"""Quick Ask: a small always-on-top window for one question, answered in place.

Its question and answer go into a conversation of their own in the history ("Open in chat"
shows it in the main window).
"""

from __future__ import annotations

import uuid

from app import bridge as engine_state
from app.bridge import EngineBridge
from app.history import HistoryError, HistoryStore
from app.qt import Qt, QtGui, QtWidgets, Signal, Slot
from app.settings import SettingsStore
from app.throttle import Throttle
from app.ui.conversation import ChatEntry, request_messages
from app.ui.history_sync import append_entry, update_entry
from app.ui.markdown import MarkdownRenderer
from app.ui.text_view import FittedTextView
from app.ui.safe_text import plain_label
from app.ui.theme import LIGHT, Theme
from engine.serving.protocol import ChatRequest, DoneEvent
from engine.types import SamplingParams

REPAINT_MS = 80
WIDTH = 560


class QuickAskWindow(QtWidgets.QWidget):
    """One question, one streamed answer; Esc closes, Enter asks."""

    open_in_chat_requested = Signal(int)  # conversation id
    conversation_created = Signal(int)  # saved to the history: the sidebar shows it at once

    def __init__(self, bridge: EngineBridge, settings: SettingsStore, history: HistoryStore | None,
                 theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent, Qt.WindowType.Tool | Qt.WindowType.WindowStaysOnTopHint)
        self.setObjectName("quickAsk")
        self.setWindowTitle("MoeBar — Quick Ask")
        self.bridge = bridge
        self.settings = settings
        self.history = history
        self.conversation_id = 0
        self._request_id = ""
        self._answer: ChatEntry | None = None
        self.answer_token_cap: int | None = None  # a shorter longest answer (the demo model's gibberish)
        self.input = QtWidgets.QLineEdit(self)
        self.input.setObjectName("quickAskInput")
        self.input.setPlaceholderText("Ask one question…")
        self.input.returnPressed.connect(self.ask)
        self.answer_view = FittedTextView(MarkdownRenderer(theme.code), self)
        self.answer_view.setMaximumHeight(420)
        self.status = plain_label(QtWidgets.QLabel(self))
        self.status.setObjectName("figuresLabel")
        self.open_button = QtWidgets.QPushButton("Open in chat", self)
        self.open_button.clicked.connect(self._on_open_in_chat)
        self.open_button.hide()
        self.stop_button = QtWidgets.QPushButton("Stop", self)
        self.stop_button.setObjectName("sendButton")
        self.stop_button.setProperty("stop", True)
        self.stop_button.clicked.connect(self.stop)
        self.stop_button.hide()
        row = QtWidgets.QHBoxLayout()
        row.addWidget(self.status, 1)
        row.addWidget(self.stop_button)
        row.addWidget(self.open_button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(12, 12, 12, 12)
        layout.addWidget(self.input)
        layout.addWidget(self.answer_view)
        layout.addLayout(row)
        self.answer_view.hide()
        self.setMinimumWidth(WIDTH)
        self.resize(WIDTH, 120)
        self._repaint = Throttle(self._show_answer, REPAINT_MS, self)
        bridge.token.connect(self._on_token)
        bridge.done.connect(self._on_done)
        bridge.engine_lost.connect(self._on_engine_lost)
        QtGui.QShortcut(QtGui.QKeySequence(Qt.Key.Key_Escape), self, self.close)

    def stop(self) -> None:
        """Stop the answer (what came so far stays, marked stopped)."""
        if self._request_id:
            self.bridge.cancel(self._request_id)
            self.status.setText("Stopping…")

    def is_answering(self) -> bool:
        """Whether an answer is streaming."""
        return bool(self._request_id)

    def popup(self) -> None:
        """Show centred near the top of the screen, ready for typing."""
        screen = QtGui.QGuiApplication.primaryScreen()
        if screen is not None:
            area = screen.availableGeometry()
            self.move(area.center().x() - self.width() // 2, area.top() + area.height() // 5)
        self.show()
        self.raise_()
        self.activateWindow()
        self.input.setFocus()
        self.input.selectAll()

    @Slot()
    def ask(self) -> None:
        """Send the question in the box."""
        question = self.input.text().strip()
        if not question or self.is_answering():
            return
        if not self.bridge.is_ready():
            busy = self.bridge.state == engine_state.BUSY
            self.status.setText("The model is answering in the chat; ask again when it is done." if busy
                                else "The model is not ready yet; try again in a moment.")
            return
        user = ChatEntry(role="user", content=question)
        self._answer = ChatEntry(role="assistant", status="streaming")
        self._request_id = uuid.uuid4().hex
        s = self.settings.settings
        self.bridge.chat(ChatRequest(
            id=self._request_id,
            messages=request_messages(s.system_prompt, [user]),
            sampling=SamplingParams(temperature=s.temperature, top_p=s.top_p,
                                    max_tokens=min(s.max_tokens, self.answer_token_cap or s.max_tokens)),
        ))
        self.status.setText("Answering…")
        self.open_button.hide()
        self.stop_button.show()
        self.answer_view.set_markdown_text("")
        self.answer_view.show()
        self._save_start(user)

    def _save_start(self, user: ChatEntry) -> None:
        if self.history is None or self._answer is None:
            return
        try:
            self.conversation_id = self.history.create_conversation(f"Quick: {user.content[:50]}")
            append_entry(self.history, self.conversation_id, user)
            append_entry(self.history, self.conversation_id, self._answer)
        except HistoryError:
            self.conversation_id = 0
            return
        self.conversation_created.emit(self.conversation_id)

    @Slot(str, str, str)
    def _on_token(self, request_id: str, text: str, kind: str) -> None:
        if request_id != self._request_id or self._answer is None:
            return
        if kind == "answer":
            self._answer.content += text
            self._repaint()

    @Slot()
    def _show_answer(self) -> None:
        if self._answer is not None:
            self.answer_view.set_markdown_text(self._answer.content)
            # Grow to fit the answer; the width stays what it was (adjustSize would shrink it).
            self.resize(self.width(), max(self.height(), self.sizeHint().height()))

    @Slot(object)
    def _on_done(self, event: DoneEvent) -> None:
        if event.id != self._request_id or self._answer is None:
            return
        self._request_id = ""
        self._repaint.flush()
        self._answer.figures = event.figures
        self._answer.status = "complete" if event.finish_reason in ("stop", "length") else "stopped"
        figures = f"{event.figures.generated_tokens} tokens · {event.figures.decode_tps:.1f} tok/s"
        if event.finish_reason == "cancelled":
            self._answer.note = "you pressed Stop"
            figures = f"Stopped · {figures}"
        elif self._answer.status == "stopped":
            self._answer.note = event.finish_reason
        self._finish(figures)

    @Slot(str, object)
    def _on_engine_lost(self, reason: str, request_ids: list[str]) -> None:
        if self._request_id and self._request_id in request_ids and self._answer is not None:
            self._request_id = ""
            self._repaint.flush()
            self._answer.status, self._answer.note = "interrupted", reason
            self._finish(f"Interrupted: {reason}")

    def _finish(self, status: str) -> None:
        self.status.setText(status)
        self.stop_button.hide()
        if self.history is not None and self._answer is not None and self._answer.stored_id is not None:
            try:
                update_entry(self.history, self._answer)
            except HistoryError:
                pass  # the answer is on screen; the main window reports history problems
        self.open_button.setVisible(self.conversation_id != 0)

    @Slot()
    def _on_open_in_chat(self) -> None:
        self.open_in_chat_requested.emit(self.conversation_id)
        self.close()

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt override)
        """Closing while answering stops the answer."""
        if self._request_id:
            self.bridge.cancel(self._request_id)
        super().closeEvent(event)
