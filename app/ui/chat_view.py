"""The scrolling list of messages; streamed text repaints at a steady rate, never per token."""

from __future__ import annotations

from app.qt import Qt, QTimer, QtWidgets, Signal, Slot
from app.throttle import Throttle
from app.ui.conversation import ChatEntry, ToolState
from app.ui.markdown import MarkdownRenderer
from app.ui.message_widget import MessageWidget
from app.ui.theme import LIGHT, Theme

STREAM_REPAINT_MS = 80  # about 12 repaints a second while tokens stream in


class ChatView(QtWidgets.QScrollArea):
    """Shows the entries of one conversation; tool results appear inside their call's card."""

    edit_submitted = Signal(int, str)
    regenerate_requested = Signal(int)
    delete_requested = Signal(int)
    tool_approved = Signal(str)
    tool_always_approved = Signal(str, str)
    tool_denied = Signal(str)

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("chatView")
        self.setWidgetResizable(True)
        self.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.setFrameShape(QtWidgets.QFrame.Shape.NoFrame)
        self._theme = theme
        self._renderer = MarkdownRenderer(theme.code)
        self._assistant_name = "Assistant"
        self._widgets: dict[int, MessageWidget] = {}
        self._dirty: set[int] = set()
        self._follow_bottom = True
        self._busy = False

        self._content = QtWidgets.QWidget(self)
        self._content.setObjectName("chatContent")
        self._layout = QtWidgets.QVBoxLayout(self._content)
        self._layout.setContentsMargins(16, 12, 16, 12)
        self._layout.setSpacing(10)
        self.placeholder = QtWidgets.QLabel(self._content)
        self.placeholder.setObjectName("chatPlaceholder")
        self.placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.placeholder.setWordWrap(True)
        self._layout.addWidget(self.placeholder)
        self._layout.addStretch(1)
        self.setWidget(self._content)
        self.set_placeholder("Ask anything. Drop files on the window to let the tools read them.")

        self._stream_throttle = Throttle(self._repaint_dirty, STREAM_REPAINT_MS, self)
        bar = self.verticalScrollBar()
        bar.valueChanged.connect(self._on_scrolled)
        bar.rangeChanged.connect(self._on_range_changed)

    # ------------------------------------------------------------ entries

    def message_widgets(self) -> list[MessageWidget]:
        """The message widgets in display order."""
        widgets = []
        for i in range(self._layout.count()):
            item = self._layout.itemAt(i)
            widget = item.widget() if item is not None else None
            if isinstance(widget, MessageWidget):
                widgets.append(widget)
        return widgets

    def widget_for(self, key: int) -> MessageWidget | None:
        """The widget showing the entry with `key`."""
        return self._widgets.get(key)

    def set_entries(self, entries: list[ChatEntry]) -> None:
        """Show a whole conversation (replacing what is shown)."""
        for key in list(self._widgets):
            self.remove_entry(key)
        for entry in entries:
            self.add_entry(entry)
        for entry in entries:
            if entry.role == "tool" and entry.tool_call_id:
                self.set_tool_state(entry.tool_call_id, entry.tool_state, entry.content)
        self._follow_bottom = True
        QTimer.singleShot(0, self.scroll_to_bottom)

    def add_entry(self, entry: ChatEntry) -> None:
        """Append an entry at the bottom (tool entries only update their card)."""
        if entry.role in ("tool", "system"):
            return
        widget = MessageWidget(entry, self._renderer, self._theme, self._assistant_name, self._content)
        widget.edit_submitted.connect(self.edit_submitted)
        widget.regenerate_requested.connect(self.regenerate_requested)
        widget.delete_requested.connect(self.delete_requested)
        widget.tool_approved.connect(self.tool_approved)
        widget.tool_always_approved.connect(self.tool_always_approved)
        widget.tool_denied.connect(self.tool_denied)
        widget.set_busy(self._busy)
        self._widgets[entry.key] = widget
        self._layout.insertWidget(self._layout.count() - 1, widget)
        self.placeholder.hide()
        self._follow_bottom = True

    def remove_entry(self, key: int) -> None:
        """Remove the widget of the entry with `key`."""
        widget = self._widgets.pop(key, None)
        self._dirty.discard(key)
        if widget is not None:
            self._layout.removeWidget(widget)
            widget.deleteLater()
        self.placeholder.setVisible(not self._widgets)

    def entry_changed(self, key: int) -> None:
        """The entry's text grew: repaint it at the next throttled tick."""
        self._dirty.add(key)
        self._stream_throttle()

    def refresh_entry(self, key: int) -> None:
        """Repaint the entry now (state changes, end of stream)."""
        self._dirty.discard(key)
        widget = self._widgets.get(key)
        if widget is not None:
            widget.refresh()

    def flush(self) -> None:
        """Repaint whatever is waiting for the throttle now."""
        self._stream_throttle.flush()

    def set_tool_state(self, call_id: str, state: ToolState, result: str = "") -> None:
        """Update the card of a tool call wherever it is shown."""
        for widget in self._widgets.values():
            if call_id in widget.cards:
                widget.set_tool_state(call_id, state, result)

    def set_busy(self, busy: bool) -> None:
        """While the engine answers, editing and regenerating wait."""
        self._busy = busy
        for widget in self._widgets.values():
            widget.set_busy(busy)

    def set_assistant_name(self, name: str) -> None:
        """The label shown over answers (the loaded model's name)."""
        self._assistant_name = name

    def set_placeholder(self, text: str) -> None:
        """The text shown while the conversation is empty."""
        self.placeholder.setText(text)

    def set_theme(self, theme: Theme) -> None:
        """Re-render every message in `theme`."""
        self._theme = theme
        self._renderer = type(self._renderer)(theme.code)
        for widget in self._widgets.values():
            widget.set_theme(theme, self._renderer)

    # ------------------------------------------------------------ scrolling

    def scroll_to_bottom(self) -> None:
        """Show the newest message."""
        bar = self.verticalScrollBar()
        bar.setValue(bar.maximum())

    @Slot()
    def _repaint_dirty(self) -> None:
        for key in sorted(self._dirty):
            widget = self._widgets.get(key)
            if widget is not None:
                widget.refresh()
        self._dirty.clear()

    @Slot(int)
    def _on_scrolled(self, value: int) -> None:
        # Follow new text only while the reader is at the bottom; scrolling up pauses it.
        self._follow_bottom = value >= self.verticalScrollBar().maximum() - 24

    @Slot(int, int)
    def _on_range_changed(self, minimum: int, maximum: int) -> None:
        if self._follow_bottom:
            self.verticalScrollBar().setValue(maximum)
