"""A bar over the chat for things the user should know: engine restarts, refused files, errors."""

from __future__ import annotations

from collections.abc import Callable

from app.qt import QTimer, QtWidgets, Slot
from app.ui.safe_text import plain_label
from app.ui.theme import LIGHT, Theme, icon

INFO_TIMEOUT_MS = 8000  # info notices go away by themselves; warnings and errors stay


class NoticeBar(QtWidgets.QFrame):
    """Shows one notice at a time, with an optional action button and a close button."""

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("noticeBar")
        self._theme = theme
        self._action: Callable[[], None] | None = None
        self.label = plain_label(QtWidgets.QLabel(self))  # notices quote engine and tool errors
        self.label.setObjectName("noticeText")
        self.label.setWordWrap(True)
        self.action_button = QtWidgets.QPushButton(self)
        self.action_button.clicked.connect(self._on_action)
        self.close_button = QtWidgets.QToolButton(self)
        self.close_button.setAutoRaise(True)
        self.close_button.setToolTip("Dismiss")
        self.close_button.clicked.connect(self.dismiss)
        layout = QtWidgets.QHBoxLayout(self)
        layout.setContentsMargins(12, 6, 6, 6)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.action_button)
        layout.addWidget(self.close_button)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self.dismiss)
        self.set_theme(theme)
        self.hide()

    def level(self) -> str:
        """The level of the notice shown ("" when hidden)."""
        return str(self.property("level") or "") if self.isVisible() else ""

    def text(self) -> str:
        """The text of the notice shown."""
        return self.label.text()

    def show_notice(
        self, level: str, text: str, action_text: str = "", action: Callable[[], None] | None = None
    ) -> None:
        """Show `text` at `level` (info, warning, error), optionally with a button running `action`."""
        self.label.setText(text)
        self.setProperty("level", level)
        self.style().unpolish(self)
        self.style().polish(self)
        self._action = action
        self.action_button.setText(action_text)
        self.action_button.setVisible(action is not None and bool(action_text))
        self.show()
        if level == "info":
            self._timer.start(INFO_TIMEOUT_MS)
        else:
            self._timer.stop()

    def set_theme(self, theme: Theme) -> None:
        """Redraw the close icon in `theme`."""
        self._theme = theme
        self.close_button.setIcon(icon("close", theme.name))

    @Slot()
    def dismiss(self) -> None:
        """Hide the notice."""
        self._timer.stop()
        self._action = None
        self.hide()

    @Slot()
    def _on_action(self) -> None:
        action = self._action
        self.dismiss()
        if action is not None:
            action()
