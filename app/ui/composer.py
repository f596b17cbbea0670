"""The message box under the chat: text, chips of dropped files, Send / Stop, attach."""

from __future__ import annotations

from app.qt import Qt, QtGui, QtWidgets, Signal, Slot
from app.ui.conversation import Attachment
from app.ui.format import human_bytes
from app.ui.safe_text import escaped_tooltip, plain_label
from app.ui.theme import LIGHT, Theme, icon


class MessageInput(QtWidgets.QPlainTextEdit):
    """Enter sends, Shift+Enter starts a new line; file drops go to the window, not the text."""

    submitted = Signal()

    def __init__(self, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("messageInput")
        self.setAcceptDrops(False)  # let the window's drop overlay take files
        self.setTabChangesFocus(True)
        self.setPlaceholderText("Message (Enter to send, Shift+Enter for a new line)")
        self.setFixedHeight(72)

    def keyPressEvent(self, event: QtGui.QKeyEvent) -> None:  # noqa: N802 (Qt override)
        """Send on Enter unless Shift is held."""
        if event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter) and not (
            event.modifiers() & Qt.KeyboardModifier.ShiftModifier
        ):
            self.submitted.emit()
            return
        super().keyPressEvent(event)


class RemovableChip(QtWidgets.QFrame):
    """A file chip with a close button (files waiting to be sent)."""

    removed = Signal(str)  # the item's name

    def __init__(self, attachment: Attachment, theme: Theme, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("fileChip")
        self.attachment = attachment
        detail = "folder" if attachment.is_folder else human_bytes(attachment.size)
        label = plain_label(QtWidgets.QLabel(f"{attachment.name} · {detail}", self))
        label.setToolTip(escaped_tooltip(attachment.path))
        close = QtWidgets.QToolButton(self)
        close.setObjectName("chipClose")
        close.setIcon(icon("close", theme.name))
        close.setAutoRaise(True)
        close.setToolTip(escaped_tooltip(f"Remove {attachment.name}"))
        close.clicked.connect(self._on_close)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(8, 1, 2, 1)
        layout.setSpacing(2)
        layout.addWidget(label)
        layout.addWidget(close)

    @Slot()
    def _on_close(self) -> None:
        self.removed.emit(self.attachment.name)


class Composer(QtWidgets.QFrame):
    """Where the user writes; shows Stop instead of Send while an answer streams."""

    send_requested = Signal(str)
    stop_requested = Signal()
    attach_requested = Signal()
    attachment_removed = Signal(str)  # name

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("composer")
        self._theme = theme
        self._busy = False
        self._attachments: list[Attachment] = []
        self.input = MessageInput(self)
        self.input.submitted.connect(self._on_submit)
        self.attach_button = QtWidgets.QToolButton(self)
        self.attach_button.setObjectName("attachButton")
        self.attach_button.setToolTip("Add files for the tools to read (or drop them on the window)")
        self.attach_button.clicked.connect(self.attach_requested)
        self.send_button = QtWidgets.QPushButton("Send", self)
        self.send_button.setObjectName("sendButton")
        self.send_button.clicked.connect(self._on_send_or_stop)
        self._chips = QtWidgets.QWidget(self)
        self._chips_layout = QtWidgets.QHBoxLayout(self._chips)
        self._chips_layout.setContentsMargins(0, 0, 0, 0)
        self._chips_layout.setSpacing(6)
        self._chips_layout.addStretch(1)
        self._chips.hide()

        row = QtWidgets.QHBoxLayout()
        row.setSpacing(6)
        row.addWidget(self.attach_button, 0, Qt.AlignmentFlag.AlignBottom)
        row.addWidget(self.input, 1)
        row.addWidget(self.send_button, 0, Qt.AlignmentFlag.AlignBottom)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(12, 6, 12, 10)
        layout.setSpacing(4)
        layout.addWidget(self._chips)
        layout.addLayout(row)
        self.set_theme(theme)

    def attachments(self) -> list[Attachment]:
        """Files waiting to go with the next message."""
        return list(self._attachments)

    def set_attachments(self, attachments: list[Attachment]) -> None:
        """Show these files as chips above the text box."""
        self._attachments = list(attachments)
        while self._chips_layout.count() > 1:
            item = self._chips_layout.takeAt(0)
            widget = item.widget() if item is not None else None
            if widget is not None:
                widget.deleteLater()
        for attachment in self._attachments:
            chip = RemovableChip(attachment, self._theme, self._chips)
            chip.removed.connect(self.attachment_removed)
            self._chips_layout.insertWidget(self._chips_layout.count() - 1, chip)
        self._chips.setVisible(bool(self._attachments))

    def set_busy(self, busy: bool) -> None:
        """Show Stop while an answer streams or tools wait, Send otherwise."""
        self._busy = busy
        self.send_button.setText("Stop" if busy else "Send")
        self.send_button.setProperty("stop", busy)
        self.send_button.setIcon(icon("stop" if busy else "send", self._theme.name))
        self.send_button.style().unpolish(self.send_button)
        self.send_button.style().polish(self.send_button)

    def set_theme(self, theme: Theme) -> None:
        """Redraw icons in `theme`."""
        self._theme = theme
        self.attach_button.setIcon(icon("attach", theme.name))
        self.set_busy(self._busy)

    def text(self) -> str:
        """The text typed so far."""
        return self.input.toPlainText()

    def clear(self) -> None:
        """Empty the text box and the chips (after sending)."""
        self.input.clear()
        self.set_attachments([])

    @Slot()
    def _on_submit(self) -> None:
        if not self._busy:
            self._on_send_or_stop()

    @Slot()
    def _on_send_or_stop(self) -> None:
        if self._busy:
            self.stop_requested.emit()
            return
        text = self.input.toPlainText().strip()
        if text:
            self.send_requested.emit(text)
