"""The chat window: history on the left, the conversation in the middle, model and gauges right."""

from __future__ import annotations

import base64
from pathlib import Path

from app import bridge as engine_state
from app.bridge import EngineBridge
from app.history import HistoryStore
from app.ops import BackgroundOp, OpContext
from app.qt import Qt, QtCore, QtGui, QtWidgets, Signal, Slot
from app.settings import SettingsStore
from app.tools import DroppedFiles, DroppedItem
from app.ui.chat_controller import ChatController
from app.ui.chat_view import ChatView
from app.ui.composer import Composer
from app.ui.conversation import Attachment, ChatEntry
from app.ui.drop_overlay import DropOverlay, local_paths, rejection_text
from app.ui.history_sidebar import HistorySidebar
from app.ui.model_panel import ModelPanel
from app.ui.notice_bar import NoticeBar
from app.ui.safe_text import plain_label
from app.ui.theme import LIGHT, Theme, app_icon, icon
from engine.serving.protocol import LoadedEvent, StatsEvent

STATE_TEXT = {
    engine_state.STOPPED: "Engine stopped",
    engine_state.STARTING: "Starting the engine…",
    engine_state.IDLE: "No model loaded",
    engine_state.LOADING: "Loading the model…",
    engine_state.READY: "Ready",
    engine_state.BUSY: "Answering…",
    engine_state.RESTARTING: "Restarting the engine…",
    engine_state.FAILED: "Engine stopped after repeated failures",
}


def attachment_for(item: DroppedItem) -> Attachment:
    """The chip data of a dropped item."""
    return Attachment(path=item.path, name=item.name, size=item.size, is_folder=item.is_folder)


class MainWindow(QtWidgets.QWidget):
    """Puts the views together and routes user actions to the controller.

    A plain top-level widget with its own layout (toolbar, splitter, status bar), not a
    QMainWindow: QMainWindow's layout animates its central widget with a QPropertyAnimation on
    every relayout, whatever ``setAnimated`` says, and deleting that animation asks PySide for a
    Python override while Qt holds its signal-slot lock. With the bridge's thread holding the
    GIL at that moment (starting the engine) the two deadlocked (PySide6 6.11, seen in CI).
    """

    settings_requested = Signal()
    model_dialog_requested = Signal()
    quick_ask_requested = Signal()

    def __init__(
        self,
        controller: ChatController,
        bridge: EngineBridge,
        settings: SettingsStore,
        history: HistoryStore | None,
        theme: Theme = LIGHT,
        parent: QtWidgets.QWidget | None = None,
    ) -> None:
        super().__init__(parent, Qt.WindowType.Window)
        self.controller = controller
        self.bridge = bridge
        self.settings = settings
        self.dropped: DroppedFiles = controller.dropped
        self._theme = theme
        self._lost_since_load = False
        self.setObjectName("mainWindow")
        self.setAttribute(Qt.WidgetAttribute.WA_StyledBackground, True)  # the theme's window background
        self.setWindowTitle("MoeBar")
        self.setWindowIcon(app_icon())
        self.setAcceptDrops(True)
        self.resize(1180, 760)

        self.sidebar = HistorySidebar(history, theme, self)
        self.chat_view = ChatView(theme, self)
        self.composer = Composer(theme, self)
        self.notice_bar = NoticeBar(theme, self)
        self.model_panel = ModelPanel(theme, self)
        center = QtWidgets.QWidget(self)
        center.setObjectName("chatColumn")
        center_layout = QtWidgets.QVBoxLayout(center)
        center_layout.setContentsMargins(0, 0, 0, 0)
        center_layout.setSpacing(0)
        center_layout.addWidget(self.notice_bar)
        center_layout.addWidget(self.chat_view, 1)
        center_layout.addWidget(self.composer)
        self.splitter = QtWidgets.QSplitter(Qt.Orientation.Horizontal, self)
        self.splitter.addWidget(self.sidebar)
        self.splitter.addWidget(center)
        self.splitter.addWidget(self.model_panel)
        self.splitter.setStretchFactor(1, 1)
        self.splitter.setSizes([230, 630, 320])
        self.splitter.setChildrenCollapsible(False)
        # An explicit minimum replaces the panel's size hint, so changing figures never move the splitter.
        self.model_panel.setMinimumWidth(320)  # room for the longest live figures
        self.overlay = DropOverlay(self, theme)
        self.menu_bar = QtWidgets.QMenuBar(self)
        self.toolbar = self._build_toolbar()
        self.status_bar = QtWidgets.QStatusBar(self)
        self.state_label = plain_label(QtWidgets.QLabel(self))
        self.status_bar.addWidget(self.state_label, 1)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(0)
        layout.setMenuBar(self.menu_bar)
        layout.addWidget(self.toolbar)
        layout.addWidget(self.splitter, 1)
        layout.addWidget(self.status_bar)
        self.overlay.raise_()
        self._connect()
        self._restore_geometry()
        self._on_engine_state(bridge.state)

    def _build_toolbar(self) -> QtWidgets.QToolBar:
        bar = QtWidgets.QToolBar("Main", self)
        bar.setObjectName("mainToolbar")
        bar.setMovable(False)
        bar.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.new_chat_action = bar.addAction(icon("new-chat", self._theme.name), "New chat")
        self.new_chat_action.setShortcut(QtGui.QKeySequence.StandardKey.New)
        self.model_action = bar.addAction(icon("model", self._theme.name), "Model…")
        self.settings_action = bar.addAction(icon("settings", self._theme.name), "Settings…")
        self.settings_action.setShortcut(QtGui.QKeySequence.StandardKey.Preferences)
        self.quick_ask_action = bar.addAction(icon("quick-ask", self._theme.name), "Quick Ask")
        self.new_chat_action.triggered.connect(self.controller.new_conversation)
        self.model_action.triggered.connect(self.model_dialog_requested)
        self.settings_action.triggered.connect(self.settings_requested)
        self.quick_ask_action.triggered.connect(self.quick_ask_requested)
        self.help_menu = self.menu_bar.addMenu("Help")
        self.selfcheck_action = self.help_menu.addAction("Check This Mac…")
        self.selfcheck_action.triggered.connect(self.show_selfcheck)
        return bar

    @Slot()
    def show_selfcheck(self) -> None:
        """Help > Check This Mac…: run the engine's self-check and show its report."""
        from app.ui.selfcheck_dialog import SelfcheckDialog

        dialog = SelfcheckDialog(self)
        dialog.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        dialog.show()
        dialog.start()

    def _connect(self) -> None:
        c, view = self.controller, self.chat_view
        c.entries_reset.connect(self._on_entries_reset)
        c.entry_added.connect(self._on_entry_added)
        c.entry_grew.connect(view.entry_changed)
        c.entry_updated.connect(view.refresh_entry)
        c.entry_removed.connect(view.remove_entry)
        c.tool_state_changed.connect(view.set_tool_state)
        c.busy_changed.connect(self._on_busy)
        c.notice.connect(self.show_notice)
        c.conversation_opened.connect(self.sidebar.set_current)
        c.history_changed.connect(self.sidebar.refresh)
        view.edit_submitted.connect(c.edit_and_resend)
        view.regenerate_requested.connect(c.regenerate)
        view.delete_requested.connect(c.delete_entry)
        view.tool_approved.connect(c.approve_tool)
        view.tool_always_approved.connect(lambda call_id, _name: c.approve_tool(call_id, always=True))
        view.tool_denied.connect(c.deny_tool)
        self.composer.send_requested.connect(self._on_send)
        self.composer.stop_requested.connect(c.stop)
        self.composer.attach_requested.connect(self._ask_files)
        self.composer.attachment_removed.connect(self._on_attachment_removed)
        self.sidebar.conversation_selected.connect(c.open_conversation)
        self.sidebar.conversation_deleted.connect(self._on_conversation_deleted)
        self.sidebar.new_chat_requested.connect(c.new_conversation)
        self.sidebar.error.connect(lambda text: self.show_notice("error", text))
        self.model_panel.change_model_requested.connect(self.model_dialog_requested)
        b = self.bridge
        b.state_changed.connect(self._on_engine_state)
        b.loaded.connect(self._on_loaded)
        b.progress.connect(self.model_panel.show_loading)
        b.stats.connect(self._on_stats)
        b.engine_lost.connect(self._on_engine_lost)
        b.gave_up.connect(self._on_gave_up)
        b.notice.connect(lambda event: self.show_notice(event.level, event.message))  # e.g. the cache was reduced

    # ------------------------------------------------------------ notices and state

    @Slot(str, str)
    def show_notice(self, level: str, text: str) -> None:
        """Show a notice over the chat."""
        self.notice_bar.show_notice(level, text)

    @Slot(str)
    def _on_engine_state(self, state: str) -> None:
        text = STATE_TEXT.get(state, state)
        if state in (engine_state.READY, engine_state.BUSY) and self.bridge.model is not None:
            text = f"{text} · {self.bridge.model.name}"
        self.state_label.setText(text)
        self.model_panel.gauges.set_working(state == engine_state.BUSY)
        if state in (engine_state.IDLE, engine_state.RESTARTING, engine_state.FAILED):
            self.model_panel.show_unloaded(text)  # IDLE: none loaded yet, unloaded, or a load failed

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        self.model_panel.show_model(event)
        self.chat_view.set_assistant_name(event.name)
        self._on_engine_state(self.bridge.state)
        if self._lost_since_load:
            self._lost_since_load = False
            self.show_notice("info", f"The engine was restarted and {event.name} is loaded again. "
                                     "Nothing in the conversation was lost.")

    @Slot(object)
    def _on_stats(self, event: StatsEvent) -> None:
        self.model_panel.gauges.set_figures(event.figures)

    @Slot(str, object)
    def _on_engine_lost(self, reason: str, request_ids: list[str]) -> None:
        self._lost_since_load = True
        if not request_ids:  # with a request cut off, the controller's notice says it
            self.show_notice("warning", f"{reason} Restarting it…")

    @Slot(str)
    def _on_gave_up(self, reason: str) -> None:
        self.notice_bar.show_notice("error", reason, "Restart engine", self.bridge.restart)

    @Slot(bool)
    def _on_busy(self, busy: bool) -> None:
        self.composer.set_busy(busy)
        self.chat_view.set_busy(busy)

    # ------------------------------------------------------------ conversation

    @Slot()
    def _on_entries_reset(self) -> None:
        self.chat_view.set_entries(self.controller.entries)
        self.composer.set_attachments([])

    @Slot(object)
    def _on_entry_added(self, entry: ChatEntry) -> None:
        if entry.role == "tool":
            return  # its card shows it
        self.chat_view.add_entry(entry)

    @Slot(str)
    def _on_send(self, text: str) -> None:
        if self.controller.send(text, self.composer.attachments()):
            self.composer.clear()

    @Slot(int)
    def _on_conversation_deleted(self, conversation_id: int) -> None:
        if conversation_id == self.controller.conversation_id:
            self.controller.new_conversation()

    # ------------------------------------------------------------ files

    def add_files(self, paths: list[str]) -> None:
        """Classify paths in the background; accepted ones become chips, refused ones a notice."""
        if not paths:
            return

        def work(ctx: OpContext) -> tuple[list[DroppedItem], list[tuple[Path, str]]]:
            return self.dropped.drop(paths)

        BackgroundOp(self, work, self._on_files_classified,
                     lambda error: self.show_notice("error", f"Could not add the files: {error}")).run()

    def _on_files_classified(self, result: tuple[list[DroppedItem], list[tuple[Path, str]]]) -> None:
        accepted, rejected = result
        chips = self.composer.attachments()
        known = {a.name for a in chips}
        chips += [attachment_for(item) for item in accepted if item.name not in known]
        self.composer.set_attachments(chips)
        if rejected:
            self.show_notice("warning", rejection_text(rejected))

    @Slot(str)
    def _on_attachment_removed(self, name: str) -> None:
        self.dropped.remove(name)
        self.composer.set_attachments([a for a in self.composer.attachments() if a.name != name])

    @Slot()
    def _ask_files(self) -> None:
        names, _ = QtWidgets.QFileDialog.getOpenFileNames(self, "Files for the tools to read", str(Path.home()))
        self.add_files(names)

    def dragEnterEvent(self, event: QtGui.QDragEnterEvent) -> None:  # noqa: N802 (Qt override)
        """Show the overlay when files come over the window."""
        paths = local_paths(event.mimeData())
        if paths:
            self.overlay.show_for(paths)
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event: QtGui.QDragMoveEvent) -> None:  # noqa: N802 (Qt override)
        """Keep accepting while files move over the window."""
        if local_paths(event.mimeData()):
            event.acceptProposedAction()

    def dragLeaveEvent(self, event: QtGui.QDragLeaveEvent) -> None:  # noqa: N802 (Qt override)
        """Hide the overlay when the drag leaves."""
        self.overlay.hide()

    def dropEvent(self, event: QtGui.QDropEvent) -> None:  # noqa: N802 (Qt override)
        """Hand the dropped files to the sandbox."""
        self.overlay.hide()
        paths = local_paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.add_files(paths)

    def resizeEvent(self, event: QtGui.QResizeEvent) -> None:  # noqa: N802 (Qt override)
        """Keep the overlay over the whole window."""
        super().resizeEvent(event)
        if self.overlay.isVisible():
            self.overlay.setGeometry(self.rect())

    # ------------------------------------------------------------ window

    def set_theme(self, theme: Theme) -> None:
        """Switch every part of the window to `theme`."""
        self._theme = theme
        self.chat_view.set_theme(theme)
        self.sidebar.set_theme(theme)
        self.composer.set_theme(theme)
        self.notice_bar.set_theme(theme)
        self.overlay.set_theme(theme)
        self.model_panel.gauges.set_theme(theme)
        for action, name in ((self.new_chat_action, "new-chat"), (self.model_action, "model"),
                             (self.settings_action, "settings"), (self.quick_ask_action, "quick-ask")):
            action.setIcon(icon(name, theme.name))

    def show_and_raise(self) -> None:
        """Bring the window to the front (from the tray)."""
        self.show()
        self.setWindowState(self.windowState() & ~Qt.WindowState.WindowMinimized)
        self.raise_()
        self.activateWindow()
        self.composer.input.setFocus()

    def _restore_geometry(self) -> None:
        saved = str(self.settings.get("window_geometry"))
        if saved:
            self.restoreGeometry(QtCore.QByteArray(base64.b64decode(saved)))

    def save_geometry(self) -> None:
        """Remember the window's position and size in the settings."""
        data = bytes(self.saveGeometry().data())
        self.settings.set("window_geometry", base64.b64encode(data).decode("ascii"))

    def closeEvent(self, event: QtGui.QCloseEvent) -> None:  # noqa: N802 (Qt override)
        """Remember the geometry; the app keeps running in the tray if there is one."""
        self.save_geometry()
        super().closeEvent(event)
