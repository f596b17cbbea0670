"""The conversation list: full-text search, rename, delete and export to Markdown."""

from __future__ import annotations

import html
import time
from pathlib import Path

from app.history import ConversationSummary, HistoryError, HistoryStore, SearchHit
from app.qt import Qt, QTimer, QtCore, QtWidgets, Signal, Slot
from app.ui.safe_text import escaped_tooltip, plain_label
from app.ui.theme import LIGHT, Theme, icon

SEARCH_DELAY_MS = 200  # search once typing pauses, not per key
ID_ROLE = Qt.ItemDataRole.UserRole
ROW_PADDING_PX = 10  # at least the padding of QListWidget#historyList::item in the style sheets (6 px 8 px)


def highlighted_snippet(hit: SearchHit) -> str:
    """The hit's snippet as HTML with the matched spans in bold."""
    parts: list[str] = []
    last = 0
    for start, end in hit.highlights:
        parts.append(html.escape(hit.snippet[last:start]))
        parts.append(f"<b>{html.escape(hit.snippet[start:end])}</b>")
        last = end
    parts.append(html.escape(hit.snippet[last:]))
    return "".join(parts)


def relative_day(timestamp: float, now: float | None = None) -> str:
    """'today', 'yesterday' or the date, for the list."""
    now = time.time() if now is None else now
    day, today = time.localtime(timestamp), time.localtime(now)
    if (day.tm_year, day.tm_yday) == (today.tm_year, today.tm_yday):
        return time.strftime("today %H:%M", day)
    if now - timestamp < 2 * 86400 and (today.tm_yday - day.tm_yday) % 366 == 1:
        return "yesterday"
    return time.strftime("%Y-%m-%d", day)


class HistorySidebar(QtWidgets.QFrame):
    """Lists stored conversations, newest first; while a search is typed, lists its matches."""

    conversation_selected = Signal(int)
    conversation_deleted = Signal(int)
    new_chat_requested = Signal()
    error = Signal(str)

    def __init__(self, store: HistoryStore | None, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("historySidebar")
        self.store = store
        self._theme = theme
        self._current = 0
        self.new_button = QtWidgets.QPushButton("New chat", self)
        self.new_button.setObjectName("newChatButton")
        self.new_button.clicked.connect(self.new_chat_requested)
        self.search_box = QtWidgets.QLineEdit(self)
        self.search_box.setObjectName("historySearch")
        self.search_box.setPlaceholderText("Search conversations")
        self.search_box.setClearButtonEnabled(True)
        self.search_box.setAcceptDrops(False)  # dropped files go to the window, not into the query
        self.list = QtWidgets.QListWidget(self)
        self.list.setObjectName("historyList")
        self.list.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.list.setUniformItemSizes(False)
        self.list.customContextMenuRequested.connect(self._on_context_menu)
        self.list.itemClicked.connect(self._on_item_clicked)
        self.list.itemActivated.connect(self._on_item_clicked)
        self.list.viewport().installEventFilter(self)  # search hits are re-fitted when the width changes
        self.empty_label = plain_label(QtWidgets.QLabel(self))  # quotes the search text
        self.empty_label.setObjectName("historyEmpty")
        self.empty_label.setWordWrap(True)
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.rename_button = self._tool_button("rename", "Rename the selected conversation")
        self.export_button = self._tool_button("export", "Export the selected conversation to Markdown")
        self.delete_button = self._tool_button("delete", "Delete the selected conversation")
        self.rename_button.clicked.connect(self._ask_rename)
        self.export_button.clicked.connect(self._ask_export)
        self.delete_button.clicked.connect(self._ask_delete)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.rename_button)
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.delete_button)
        buttons.addStretch(1)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(8, 8, 8, 8)
        layout.setSpacing(6)
        layout.addWidget(self.new_button)
        layout.addWidget(self.search_box)
        layout.addWidget(self.list, 1)
        layout.addWidget(self.empty_label)
        layout.addLayout(buttons)
        self._search_timer = QTimer(self)
        self._search_timer.setSingleShot(True)
        self._search_timer.setInterval(SEARCH_DELAY_MS)
        self._search_timer.timeout.connect(self.refresh)
        self.search_box.textChanged.connect(lambda _text: self._search_timer.start())
        self.list.currentItemChanged.connect(lambda *_: self._update_buttons())
        self.setEnabled(store is not None)
        self.refresh()

    def set_theme(self, theme: Theme) -> None:
        """Redraw the icons in `theme`."""
        self._theme = theme
        for button, name in ((self.rename_button, "rename"), (self.export_button, "export"),
                             (self.delete_button, "delete")):
            button.setIcon(icon(name, theme.name))

    def _tool_button(self, name: str, tip: str) -> QtWidgets.QToolButton:
        button = QtWidgets.QToolButton(self)
        button.setIcon(icon(name, self._theme.name))
        button.setToolTip(tip)
        button.setAutoRaise(True)
        return button

    # ------------------------------------------------------------ listing

    def shown_ids(self) -> list[int]:
        """Conversation ids in the list, top to bottom."""
        return [int(self.list.item(i).data(ID_ROLE)) for i in range(self.list.count())]

    def selected_id(self) -> int:
        """The selected conversation's id, or 0."""
        item = self.list.currentItem()
        return int(item.data(ID_ROLE)) if item is not None else 0

    @Slot()
    def refresh(self) -> None:
        """Reload the list, or the search results while a search is typed."""
        self._search_timer.stop()
        self.list.clear()
        if self.store is None:
            self._show_empty("History is not available.")
            return
        query = self.search_box.text().strip()
        try:
            if query:
                self._fill_hits(self.store.search(query))
            else:
                self._fill_conversations(self.store.list_conversations())
        except HistoryError as exc:
            self.error.emit(str(exc))
        if self.list.count() == 0:
            self._show_empty(f"No conversation mentions “{query}”." if query else "No conversations yet.")
        else:
            self.empty_label.hide()
        self._select(self._current)
        self._update_buttons()

    def _show_empty(self, text: str) -> None:
        self.empty_label.setText(text)
        self.empty_label.show()

    def _fill_conversations(self, conversations: list[ConversationSummary]) -> None:
        for summary in conversations:
            item = QtWidgets.QListWidgetItem(f"{summary.title}\n{relative_day(summary.updated_at)}")
            item.setData(ID_ROLE, summary.id)
            item.setToolTip(escaped_tooltip(f"{summary.title}\n{summary.message_count} messages" +
                                            (f" · {summary.model}" if summary.model else "")))
            self.list.addItem(item)

    def _fill_hits(self, hits: list[SearchHit]) -> None:
        for hit in hits:
            item = QtWidgets.QListWidgetItem()
            item.setData(ID_ROLE, hit.conversation_id)
            item.setToolTip(escaped_tooltip(hit.snippet))
            label = QtWidgets.QLabel(f"<b>{html.escape(hit.title)}</b><br><small>{highlighted_snippet(hit)}</small>")
            label.setObjectName("searchHit")
            label.setWordWrap(True)
            label.setTextFormat(Qt.TextFormat.RichText)
            label.setContentsMargins(6, 4, 6, 4)
            label.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
            self.list.addItem(item)
            self.list.setItemWidget(item, label)
        self._fit_hits()

    def _fit_hits(self) -> None:
        """Make each search hit's row as tall as its wrapped text at the list's current width."""
        width = max(120, self.list.viewport().width() - 2 * self.list.spacing() - 4)
        for row in range(self.list.count()):
            item = self.list.item(row)
            label = self.list.itemWidget(item) if item is not None else None
            if item is None or not isinstance(label, QtWidgets.QLabel):
                continue
            label.ensurePolished()  # the style sheet's font and padding count in the height
            # The style sheet pads each row (8 px a side), so the label wraps in less than the row's width.
            item.setSizeHint(QtCore.QSize(width, label.heightForWidth(max(60, width - 2 * ROW_PADDING_PX)) + 16))

    def eventFilter(self, watched: QtCore.QObject, event: QtCore.QEvent) -> bool:  # noqa: N802 (Qt override)
        """Re-fit search hits when the list's width changes."""
        if watched is self.list.viewport() and event.type() == QtCore.QEvent.Type.Resize:
            self._fit_hits()
        return super().eventFilter(watched, event)

    def set_current(self, conversation_id: int) -> None:
        """Mark the conversation shown in the chat (0 for a new, unsaved chat)."""
        self._current = conversation_id
        self._select(conversation_id)

    def _select(self, conversation_id: int) -> None:
        for i in range(self.list.count()):
            if int(self.list.item(i).data(ID_ROLE)) == conversation_id:
                self.list.setCurrentRow(i)
                return
        self.list.setCurrentRow(-1)

    def _update_buttons(self) -> None:
        has = self.selected_id() != 0
        for button in (self.rename_button, self.export_button, self.delete_button):
            button.setEnabled(has)

    @Slot(QtWidgets.QListWidgetItem)
    def _on_item_clicked(self, item: QtWidgets.QListWidgetItem) -> None:
        self.conversation_selected.emit(int(item.data(ID_ROLE)))

    # ------------------------------------------------------------ actions

    def rename(self, conversation_id: int, title: str) -> None:
        """Give a conversation a new title."""
        if self.store is None or not title.strip():
            return
        try:
            self.store.rename_conversation(conversation_id, title)
        except HistoryError as exc:
            self.error.emit(str(exc))
        self.refresh()

    def delete(self, conversation_id: int) -> None:
        """Delete a conversation and its messages."""
        if self.store is None:
            return
        try:
            self.store.delete_conversation(conversation_id)
        except HistoryError as exc:
            self.error.emit(str(exc))
            return
        self.conversation_deleted.emit(conversation_id)
        self.refresh()

    def export(self, conversation_id: int, path: Path) -> None:
        """Write a conversation as Markdown to `path`."""
        if self.store is None:
            return
        try:
            path.write_text(self.store.export_markdown(conversation_id), encoding="utf-8")
        except (HistoryError, OSError) as exc:
            self.error.emit(f"Could not export to {path}: {exc}")

    @Slot()
    def _ask_rename(self) -> None:
        conversation_id = self.selected_id()
        item = self.list.currentItem()
        if not conversation_id or item is None:
            return
        current = item.text().split("\n")[0] if item.text() else ""
        title, ok = QtWidgets.QInputDialog.getText(self, "Rename conversation", "Title:", text=current)
        if ok:
            self.rename(conversation_id, title)

    @Slot()
    def _ask_delete(self) -> None:
        conversation_id = self.selected_id()
        if not conversation_id:
            return
        answer = QtWidgets.QMessageBox.question(
            self, "Delete conversation", "Delete this conversation and all its messages? This cannot be undone."
        )
        if answer == QtWidgets.QMessageBox.StandardButton.Yes:
            self.delete(conversation_id)

    @Slot()
    def _ask_export(self) -> None:
        conversation_id = self.selected_id()
        if not conversation_id:
            return
        item = self.list.currentItem()
        stem = (item.text().split("\n")[0] if item is not None else "conversation") or "conversation"
        safe = "".join(c if c.isalnum() or c in " -_" else "_" for c in stem).strip() or "conversation"
        name, _ = QtWidgets.QFileDialog.getSaveFileName(
            self, "Export to Markdown", str(Path.home() / f"{safe}.md"), "Markdown (*.md)"
        )
        if name:
            self.export(conversation_id, Path(name))

    @Slot(QtCore.QPoint)
    def _on_context_menu(self, position: QtCore.QPoint) -> None:
        item = self.list.itemAt(position)
        if item is None:
            return
        self.list.setCurrentItem(item)
        menu = QtWidgets.QMenu(self)
        menu.addAction("Rename…", self._ask_rename)
        menu.addAction("Export to Markdown…", self._ask_export)
        menu.addSeparator()
        menu.addAction("Delete…", self._ask_delete)
        menu.exec(self.list.viewport().mapToGlobal(position))
