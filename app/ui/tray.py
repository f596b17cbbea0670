"""The menu-bar item: an icon showing idle / working / error, and a menu with live figures.

On macOS a status item with a menu attached opens that menu on every click (and the app has
no Dock icon), so the menu is attached only while it is shown; elsewhere it stays attached.
The figures in the menu refresh only while it is open, a few times a second.
"""

from __future__ import annotations

import sys

from app import bridge as engine_state
from app.bridge import EngineBridge
from app.qt import QObject, QTimer, QtGui, QtWidgets, Signal, Slot
from app.ui.format import human_rate, tokens_per_second
from app.ui.theme import ThemeName, icon
from engine.serving.protocol import LiveFigures, LoadedEvent, StatsEvent

MENU_REFRESH_MS = 500
ERROR_STATES = (engine_state.FAILED,)
WORKING_STATES = (engine_state.BUSY, engine_state.LOADING, engine_state.STARTING, engine_state.RESTARTING)


def tray_state_for(engine: str) -> str:
    """The icon variant ("idle", "working" or "error") for an engine state."""
    if engine in ERROR_STATES:
        return "error"
    if engine in WORKING_STATES:
        return "working"
    return "idle"


def tray_available() -> bool:
    """Whether the desktop has a system tray / menu bar to put the item in."""
    return QtWidgets.QSystemTrayIcon.isSystemTrayAvailable()


class TrayController(QObject):
    """Owns the QSystemTrayIcon and its menu; emits what the user picked."""

    open_chat_requested = Signal()
    quick_ask_requested = Signal()
    settings_requested = Signal()
    quit_requested = Signal()

    def __init__(self, bridge: EngineBridge, theme: ThemeName = "light", parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self._theme: ThemeName = theme
        self._state = tray_state_for(bridge.state)
        self._error_text = ""
        self._figures: LiveFigures | None = None
        self.icon = QtWidgets.QSystemTrayIcon(self)
        self.menu = QtWidgets.QMenu()
        self.menu.setObjectName("trayMenu")
        self.model_action = self.menu.addAction("No model loaded")
        self.model_action.setEnabled(False)
        self.decode_action = self.menu.addAction("")
        self.ssd_action = self.menu.addAction("")
        self.pressure_action = self.menu.addAction("")
        for action in (self.decode_action, self.ssd_action, self.pressure_action):
            action.setEnabled(False)  # read-only figures
        self.menu.addSeparator()
        self.open_action = self.menu.addAction(icon("new-chat", theme), "Open Chat")
        self.quick_action = self.menu.addAction(icon("quick-ask", theme), "Quick Ask…")
        self.settings_action = self.menu.addAction(icon("settings", theme), "Settings…")
        self.menu.addSeparator()
        self.quit_action = self.menu.addAction(icon("quit", theme), "Quit MoeBar")
        self.open_action.triggered.connect(self.open_chat_requested)
        self.quick_action.triggered.connect(self.quick_ask_requested)
        self.settings_action.triggered.connect(self.settings_requested)
        self.quit_action.triggered.connect(self.quit_requested)
        self.menu.aboutToShow.connect(self._on_menu_shown)
        self.menu.aboutToHide.connect(self._on_menu_hidden)
        self._attach_menu_permanently = sys.platform != "darwin"
        if self._attach_menu_permanently:
            self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._on_activated)
        self._menu_timer = QTimer(self)
        self._menu_timer.setInterval(MENU_REFRESH_MS)
        self._menu_timer.timeout.connect(self.refresh_menu)
        bridge.state_changed.connect(self._on_engine_state)
        bridge.loaded.connect(self._on_loaded)
        bridge.stats.connect(self._on_stats)
        bridge.gave_up.connect(self._on_gave_up)
        self._show_state()
        self.refresh_menu()

    def state(self) -> str:
        """The icon variant shown: idle, working or error."""
        return self._state

    def show(self) -> None:
        """Put the item in the menu bar."""
        self.icon.show()

    def hide(self) -> None:
        """Take the item out of the menu bar."""
        self.icon.hide()

    def set_theme(self, theme: ThemeName) -> None:
        """Draw the icons for a light or dark menu bar."""
        self._theme = theme
        for action, name in ((self.open_action, "new-chat"), (self.quick_action, "quick-ask"),
                             (self.settings_action, "settings"), (self.quit_action, "quit")):
            action.setIcon(icon(name, theme))
        self._show_state()

    def _show_state(self) -> None:
        self.icon.setIcon(icon(f"tray-{self._state}", self._theme))
        model = self.bridge.model.name if self.bridge.model else "no model"
        tip = {"idle": f"MoeBar — {model}", "working": f"MoeBar — working ({model})",
               "error": f"MoeBar — engine stopped: {self._error_text}"}[self._state]
        self.icon.setToolTip(tip)

    @Slot()
    def refresh_menu(self) -> None:
        """Write the model name and the latest figures into the menu."""
        model = self.bridge.model
        self.model_action.setText(f"Model: {model.name}" if model else "No model loaded")
        f = self._figures
        if self._state == "error":
            self.decode_action.setText(f"Engine stopped: {self._error_text[:80]}")
        else:
            self.decode_action.setText(f"Decode: {tokens_per_second(f.decode_tps) if f else '—'}")
        self.ssd_action.setText(f"SSD read: {human_rate(f.engine_read_bps) if f else '—'}")
        self.pressure_action.setText(f"Memory pressure: {f.pressure_level if f else 'unknown'}")

    @Slot(str)
    def _on_engine_state(self, state: str) -> None:
        new = tray_state_for(state)
        if new != "error":
            self._error_text = ""
        if new != self._state:
            self._state = new
            self._show_state()
            self.refresh_menu()

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        self._show_state()
        self.refresh_menu()

    @Slot(object)
    def _on_stats(self, event: StatsEvent) -> None:
        self._figures = event.figures  # the menu shows it on its next refresh, not per event

    @Slot(str)
    def _on_gave_up(self, reason: str) -> None:
        self._error_text = reason
        self._state = "error"
        self._show_state()

    @Slot()
    def _on_menu_shown(self) -> None:
        self.refresh_menu()
        self._menu_timer.start()

    @Slot()
    def _on_menu_hidden(self) -> None:
        self._menu_timer.stop()
        if not self._attach_menu_permanently:
            self.icon.setContextMenu(None)  # type: ignore[arg-type]

    @Slot(QtWidgets.QSystemTrayIcon.ActivationReason)
    def _on_activated(self, reason: QtWidgets.QSystemTrayIcon.ActivationReason) -> None:
        if self._attach_menu_permanently:
            if reason == QtWidgets.QSystemTrayIcon.ActivationReason.Trigger:
                self.open_chat_requested.emit()  # left click opens the chat, right click the menu
            return
        # macOS: attach the menu only for this click, so it is not stuck open on every click.
        self.icon.setContextMenu(self.menu)
        self.menu.popup(QtGui.QCursor.pos())
