"""One message in the chat: text, collapsed thinking, file chips, tool cards, figures, actions."""

from __future__ import annotations

from app.qt import Qt, QtGui, QtWidgets, Signal, Slot
from app.ui.conversation import Attachment, ChatEntry, ToolState
from app.ui.format import human_bytes, message_figures_line
from app.ui.markdown import MarkdownRenderer
from app.ui.text_view import FittedTextView
from app.ui.safe_text import escaped_tooltip, plain_label
from app.ui.theme import LIGHT, Theme, icon
from app.ui.tool_card import ToolCallCard
from engine.serving.protocol import ToolCall

STATUS_TEXT = {
    "streaming": "writing…",
    "stopped": "stopped",
    "interrupted": "interrupted",
    "error": "failed",
}


class FileChip(QtWidgets.QLabel):
    """A small rounded label naming an attached file."""

    def __init__(self, attachment: Attachment, parent: QtWidgets.QWidget | None = None) -> None:
        detail = "folder" if attachment.is_folder else human_bytes(attachment.size)
        super().__init__(f"{attachment.name} · {detail}", parent)
        plain_label(self)
        self.setObjectName("fileChip")
        self.setToolTip(escaped_tooltip(attachment.path))


class MessageWidget(QtWidgets.QFrame):
    """Renders one `ChatEntry`; the chat view calls `refresh()` (throttled) as it changes."""

    edit_submitted = Signal(int, str)  # entry key, new text
    regenerate_requested = Signal(int)
    delete_requested = Signal(int)
    tool_approved = Signal(str)
    tool_always_approved = Signal(str, str)
    tool_denied = Signal(str)

    def __init__(
        self,
        entry: ChatEntry,
        renderer: MarkdownRenderer,
        theme: Theme = LIGHT,
        assistant_name: str = "Assistant",
        parent: QtWidgets.QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.entry = entry
        self._theme = theme
        self.setObjectName("userMessage" if entry.role == "user" else "assistantMessage")
        self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Preferred, QtWidgets.QSizePolicy.Policy.Maximum)
        self.cards: dict[str, ToolCallCard] = {}
        self.render_count = 0  # how often the text was re-rendered (tests check throttling)
        self._rendered_text: str | None = None
        self._rendered_reasoning: str | None = None

        self.role_label = plain_label(QtWidgets.QLabel("You" if entry.role == "user" else assistant_name, self))
        self.role_label.setObjectName("roleLabel")
        self.status_label = plain_label(QtWidgets.QLabel(self))  # notes can quote engine and tool errors
        self.status_label.setObjectName("statusLabel")
        self.status_label.setWordWrap(True)  # a long note wraps instead of widening the message
        self.status_label.setSizePolicy(QtWidgets.QSizePolicy.Policy.Ignored, QtWidgets.QSizePolicy.Policy.Preferred)
        header = QtWidgets.QHBoxLayout()
        header.setSpacing(8)
        header.addWidget(self.role_label)
        header.addWidget(self.status_label, 1)

        self.thinking_toggle = QtWidgets.QToolButton(self)
        self.thinking_toggle.setObjectName("thinkingToggle")
        self.thinking_toggle.setCheckable(True)
        self.thinking_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.thinking_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.thinking_toggle.toggled.connect(self._on_thinking_toggled)
        self.thinking_view = FittedTextView(renderer, self)
        self.thinking_view.setObjectName("thinkingText")
        self.thinking_view.hide()

        self.text_view = FittedTextView(renderer, self)
        self.editor = QtWidgets.QPlainTextEdit(self)
        self.editor.setObjectName("messageEditor")
        self.editor.hide()
        self.save_edit_button = QtWidgets.QPushButton("Save and send", self)
        self.cancel_edit_button = QtWidgets.QPushButton("Cancel", self)
        self.save_edit_button.clicked.connect(self._on_save_edit)
        self.cancel_edit_button.clicked.connect(self.cancel_edit)
        self._edit_buttons = QtWidgets.QWidget(self)
        edit_row = QtWidgets.QHBoxLayout(self._edit_buttons)
        edit_row.setContentsMargins(0, 0, 0, 0)
        edit_row.addStretch(1)
        edit_row.addWidget(self.cancel_edit_button)
        edit_row.addWidget(self.save_edit_button)
        self._edit_buttons.hide()

        self._chips = QtWidgets.QWidget(self)
        chips = QtWidgets.QHBoxLayout(self._chips)
        chips.setContentsMargins(0, 0, 0, 0)
        for attachment in entry.attachments:
            chips.addWidget(FileChip(attachment, self._chips))
        chips.addStretch(1)
        self._chips.setVisible(bool(entry.attachments))

        self._cards_box = QtWidgets.QVBoxLayout()
        self._cards_box.setSpacing(6)

        self.figures_label = plain_label(QtWidgets.QLabel(self))
        self.figures_label.setObjectName("figuresLabel")
        self.figures_label.setWordWrap(True)
        self.figures_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.copy_button = self._action_button("copy", "Copy message")
        self.edit_button = self._action_button("edit", "Edit and resend")
        self.regenerate_button = self._action_button("regenerate", "Regenerate this answer")
        self.delete_button = self._action_button("delete", "Delete message")
        self.copy_button.clicked.connect(self._on_copy)
        self.edit_button.clicked.connect(self.start_edit)
        self.regenerate_button.clicked.connect(lambda: self.regenerate_requested.emit(self.entry.key))
        self.delete_button.clicked.connect(lambda: self.delete_requested.emit(self.entry.key))
        actions = QtWidgets.QHBoxLayout()
        actions.setSpacing(2)
        for button in (self.copy_button, self.edit_button, self.regenerate_button, self.delete_button):
            actions.addWidget(button)
        actions.addStretch(1)
        self.edit_button.setVisible(entry.role == "user")
        self.regenerate_button.setVisible(entry.role == "assistant")

        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(12, 8, 12, 6)
        layout.setSpacing(4)
        layout.addLayout(header)
        layout.addWidget(self.thinking_toggle)
        layout.addWidget(self.thinking_view)
        layout.addWidget(self.text_view)
        layout.addWidget(self.editor)
        layout.addWidget(self._edit_buttons)
        layout.addWidget(self._chips)
        layout.addLayout(self._cards_box)
        layout.addWidget(self.figures_label)
        layout.addLayout(actions)
        self.refresh()

    def resizeEvent(self, event: QtGui.QResizeEvent) -> None:  # noqa: N802 (Qt override)
        """Wrapped labels claim the height their text needs at this width, so the scroll area's
        layout (which sizes by minimum heights) never squeezes them under the action icons."""
        super().resizeEvent(event)
        self._fit_wrapped_labels()

    def _fit_wrapped_labels(self) -> None:
        for label in (self.status_label, self.figures_label):
            needed = label.heightForWidth(label.width()) if label.text() else 0
            if needed > 0 and label.minimumHeight() != needed:
                label.setMinimumHeight(needed)

    def _action_button(self, icon_name: str, tip: str) -> QtWidgets.QToolButton:
        button = QtWidgets.QToolButton(self)
        button.setObjectName("messageAction")
        button.setIcon(icon(icon_name, self._theme.name))
        button.setToolTip(tip)
        button.setAutoRaise(True)
        return button

    def refresh(self) -> None:
        """Show the entry's current text, thinking, cards, status and figures."""
        entry = self.entry
        if entry.content != self._rendered_text:
            self._rendered_text = entry.content
            self.render_count += 1
            if entry.role == "user":
                self.text_view.set_plain(entry.content)
            else:
                self.text_view.set_markdown_text(entry.content)
        self.text_view.setVisible(bool(entry.content) or entry.role == "user")
        if entry.reasoning != self._rendered_reasoning:
            self._rendered_reasoning = entry.reasoning
            self.thinking_view.set_markdown_text(entry.reasoning)
        thinking_now = entry.status == "streaming" and bool(entry.reasoning) and not entry.content
        self.thinking_toggle.setText("Thinking…" if thinking_now else "Thought process")
        self.thinking_toggle.setVisible(bool(entry.reasoning))
        for call in entry.tool_calls:
            if call.id not in self.cards:
                self._add_card(call)
        self.status_label.setText(self._status_text())
        self.status_label.setProperty("status", entry.status)
        self.status_label.style().unpolish(self.status_label)
        self.status_label.style().polish(self.status_label)
        self.figures_label.setText(message_figures_line(entry.figures) if entry.figures else "")
        self.figures_label.setVisible(entry.figures is not None)
        streaming = entry.status == "streaming"
        self.regenerate_button.setEnabled(not streaming)
        self.delete_button.setEnabled(not streaming)

    def _status_text(self) -> str:
        entry = self.entry
        text = STATUS_TEXT.get(entry.status, "")
        if entry.status == "streaming" and entry.note and not (entry.content or entry.reasoning):
            return entry.note  # the prompt's prefill progress, until the first words arrive
        if entry.note:
            text = f"{text}: {entry.note}" if text else entry.note
        return text

    def _add_card(self, call: ToolCall) -> None:
        card = ToolCallCard(call, self)
        card.approved.connect(self.tool_approved)
        card.always_approved.connect(self.tool_always_approved)
        card.denied.connect(self.tool_denied)
        self.cards[call.id] = card
        self._cards_box.addWidget(card)

    def set_tool_state(self, call_id: str, state: ToolState, result: str = "") -> None:
        """Update the card of `call_id` (see ToolCallCard.set_state)."""
        card = self.cards.get(call_id)
        if card is not None:
            card.set_state(state, result)

    def set_busy(self, busy: bool) -> None:
        """While the engine answers, editing and regenerating wait."""
        self.edit_button.setEnabled(not busy)
        self.regenerate_button.setEnabled(not busy and self.entry.status != "streaming")

    def set_theme(self, theme: Theme, renderer: MarkdownRenderer) -> None:
        """Re-render in another theme."""
        self._theme = theme
        for view in (self.text_view, self.thinking_view):
            view.set_renderer(renderer)
        for button, name in (
            (self.copy_button, "copy"),
            (self.edit_button, "edit"),
            (self.regenerate_button, "regenerate"),
            (self.delete_button, "delete"),
        ):
            button.setIcon(icon(name, theme.name))
        self._rendered_text = None
        self._rendered_reasoning = None
        self.refresh()

    def is_editing(self) -> bool:
        """Whether the inline editor is open."""
        return self.editor.isVisible()

    @Slot()
    def start_edit(self) -> None:
        """Open the inline editor on this user message."""
        self.editor.setPlainText(self.entry.content)
        self.text_view.hide()
        self.editor.show()
        self._edit_buttons.show()
        self.editor.setFocus()

    @Slot()
    def cancel_edit(self) -> None:
        """Close the editor without changing the message."""
        self.editor.hide()
        self._edit_buttons.hide()
        self.text_view.show()

    @Slot()
    def _on_save_edit(self) -> None:
        text = self.editor.toPlainText().strip()
        if not text:
            return
        self.cancel_edit()
        self.edit_submitted.emit(self.entry.key, text)

    @Slot()
    def _on_copy(self) -> None:
        QtGui.QGuiApplication.clipboard().setText(self.entry.content)

    @Slot(bool)
    def _on_thinking_toggled(self, expanded: bool) -> None:
        self.thinking_toggle.setArrowType(Qt.ArrowType.DownArrow if expanded else Qt.ArrowType.RightArrow)
        self.thinking_view.setVisible(expanded)
