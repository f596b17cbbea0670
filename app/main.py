"""`moebar`: the menu-bar chat app. Starts the engine, the window, the tray item and Quick Ask."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from app import paths
from app.bridge import EngineBridge
from app.history import HistoryError, HistoryStore, open_history
from app.hotkey import GlobalHotkey, HotkeyBackend, HotkeyError, hotkey_backend
from app.mcp.servers_panel import McpServersPanel
from app.mcp.service import McpService
from app.platform_check import exit_if_qt_cannot_start
from app.qt import QtCore, QtWidgets, Slot
from app.settings import SettingsStore
from app.single_instance import SingleInstance
from app.tools import DroppedFiles
from app.ui.chat_controller import ChatController
from app.ui.local_server import LocalServerController, LocalServerPanel
from app.ui.macos import hide_dock_icon
from app.ui.main_window import MainWindow
from app.ui.model_dialog import ModelDialog
from app.ui.model_manager import ModelManager
from app.ui.model_picker import ModelPicker
from app.ui.quick_ask import QuickAskWindow
from app.ui.settings_dialog import SettingsDialog
from app.ui.several_macs_panel import SeveralMacsController, SeveralMacsPanel
from app.ui.theme import app_icon, apply_theme, resolve_theme
from app.ui.tray import TrayController, tray_available
from app.ui.tray_extras import install_tray_extras
from engine.cli import moebar_version
from engine.serving.protocol import LoadedEvent

log = logging.getLogger(__name__)
DEMO_ANSWER_TOKENS = 120  # the demo model's longest answer (unless Settings asks for less)


class MoeBarApp(QtCore.QObject):
    """Every long-lived part of the app, wired together (the entry point and tests build one)."""

    def __init__(self, qt_app: QtWidgets.QApplication, engine_command: Sequence[str] | None = None,
                 use_tray: bool | None = None, hotkey: HotkeyBackend | None = None) -> None:
        super().__init__()
        self.qt_app = qt_app
        self.settings = SettingsStore()
        self.theme = resolve_theme(str(self.settings.get("theme")))
        apply_theme(qt_app, self.theme)
        self.history: HistoryStore | None
        history_notice = ""
        try:
            self.history, corrupt = open_history()
            history_notice = corrupt or ""
        except HistoryError as exc:
            self.history, history_notice = None, f"{exc} Chats will not be saved this session."
        self.bridge = EngineBridge(engine_command, log_path=paths.log_dir() / "engine.log")
        self.mcp = McpService()  # reads mcp.json (problems become notices); servers start in start()
        self.controller = ChatController(self.bridge, self.settings, self.history, DroppedFiles(),
                                         mcp_tools=self.mcp.tools)
        self.models = ModelManager(self.bridge, self.settings)
        self.picker = ModelPicker(self.bridge, self.settings, self.models)
        self.local_server = LocalServerController(self.bridge, self.settings)
        self.several_macs = SeveralMacsController(self.bridge, self.settings)  # before the engine starts
        self.window = MainWindow(self.controller, self.bridge, self.settings, self.history, self.theme)
        self.quick_ask = QuickAskWindow(self.bridge, self.settings, self.history, self.theme)
        self.hotkey = GlobalHotkey(hotkey if hotkey is not None else hotkey_backend(), self)
        self.hotkey.pressed.connect(self.quick_ask.popup)
        self.tray: TrayController | None = None
        if tray_available() if use_tray is None else use_tray:
            self.tray = TrayController(self.bridge, self.theme.name)
            self.tray.open_chat_requested.connect(self.window.show_and_raise)
            self.tray.quick_ask_requested.connect(self.quick_ask.popup)
            self.tray.settings_requested.connect(self.open_settings)
            self.tray.quit_requested.connect(self.quit)
            install_tray_extras(self.tray, self.picker, self.local_server)
            self.tray.show()
        # With a tray the app lives on after its window closes; without one, closing quits.
        qt_app.setQuitOnLastWindowClosed(self.tray is None)
        self.window.settings_requested.connect(self.open_settings)
        self.window.model_dialog_requested.connect(self.open_model_dialog)
        self.window.quick_ask_requested.connect(self.quick_ask.popup)
        self.quick_ask.open_in_chat_requested.connect(self._open_quick_ask_chat)
        self.quick_ask.conversation_created.connect(lambda _id: self.window.sidebar.refresh())
        self.models.status.connect(self.window.state_label.setText)
        self.models.failed.connect(lambda text: self.window.show_notice("error", text))
        self.picker.failed.connect(lambda text: self.window.show_notice("error", text))
        self.local_server.failed.connect(lambda text: self.window.show_notice("error", text))
        self.several_macs.failed.connect(lambda text: self.window.show_notice("error", text))
        for problem in self.mcp.problems:
            self.window.show_notice("warning", f"MCP servers: {problem}")
        self.models.using_demo.connect(self._on_using_demo)
        self.bridge.loaded.connect(self._on_loaded)
        self.settings.changed.connect(self._on_setting_changed)
        qt_app.aboutToQuit.connect(self.shutdown)
        for warning in self.settings.load_warnings:
            self.window.show_notice("warning", warning)
        if history_notice:
            self.window.show_notice("error", history_notice)

    def apply_hotkey(self) -> None:
        """Grab the Quick Ask shortcut from the settings; a notice says why when it cannot be had."""
        try:
            self.hotkey.set_shortcut(str(self.settings.get("quick_ask_shortcut")))
        except HotkeyError as exc:
            log.warning("Quick Ask shortcut: %s", exc)
            if self.hotkey.backend is not None:  # no API here (Wayland, offscreen): Settings says so
                self.window.show_notice("warning", f"The Quick Ask shortcut is off: {exc}.")

    def start(self, show_window: bool = True) -> None:
        """Show the window (unless living in the tray only) and load the model."""
        self.apply_hotkey()
        if show_window or self.tray is None:
            self.window.show_and_raise()
        self.models.load_configured()
        self.mcp.start_all()
        if self.settings.get("local_server_enabled"):
            self.local_server.apply()  # sent to the engine with (after) the model's load

    def build_settings_dialog(self) -> SettingsDialog:
        """The settings dialog with the MCP servers', the local server's and the several Macs' sections."""
        trained = 0
        if self.bridge.model is not None:
            trained = int(self.bridge.model.plan.get("trained_experts_per_token", 0) or 0)
        dialog = SettingsDialog(self.settings, trained, self.window)
        dialog.add_section("MCP tool servers", McpServersPanel(self.mcp, dialog))
        server_panel = LocalServerPanel(self.settings, self.local_server, dialog)
        dialog.add_section("Local server", server_panel)
        dialog.accepted.connect(server_panel.save)
        macs_panel = SeveralMacsPanel(self.settings, self.several_macs, dialog)
        dialog.add_section("Several Macs", macs_panel, macs_panel.problem)
        dialog.accepted.connect(macs_panel.save)
        return dialog

    @Slot()
    def open_settings(self) -> None:
        """Show the settings dialog."""
        self.build_settings_dialog().exec()

    @Slot()
    def open_model_dialog(self) -> None:
        """Show the model dialog."""
        ModelDialog(self.settings, self.models, self.window).exec()

    @Slot()
    def quit(self) -> None:
        """Quit the app (the engine is stopped on the way out)."""
        self.qt_app.quit()

    @Slot()
    def shutdown(self) -> None:
        """Stop the engine and close the history."""
        self.window.save_geometry()
        if self.tray is not None:
            self.tray.hide()
        self.hotkey.close()
        self.bridge.shutdown()
        self.mcp.shutdown()
        if self.history is not None:
            self.history.close()
            self.history = None

    @Slot(int)
    def _open_quick_ask_chat(self, conversation_id: int) -> None:
        self.window.sidebar.refresh()
        self.controller.open_conversation(conversation_id)
        self.window.show_and_raise()

    @Slot(bool)
    def _on_using_demo(self, demo: bool) -> None:
        if demo:
            self.window.chat_view.set_placeholder(
                "No model is configured, so the built-in demo model is used: its weights are random and "
                "its answers are gibberish, but every part of the app works. Choose a real model with "
                "Model… in the toolbar.")

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        demo_dir = self.models.demo_dir
        demo = demo_dir is not None and Path(event.model_dir).resolve() == demo_dir.resolve()
        self.window.model_panel.set_note("Demo model: random weights, so the answers are gibberish." if demo else "")
        cap = DEMO_ANSWER_TOKENS if demo else None  # gibberish is not worth thousands of tokens
        self.controller.answer_token_cap = cap
        self.quick_ask.answer_token_cap = cap

    @Slot(str)
    def _on_setting_changed(self, name: str) -> None:
        if name == "quick_ask_shortcut":
            self.apply_hotkey()
        if name == "theme":
            self.theme = resolve_theme(str(self.settings.get("theme")))
            apply_theme(self.qt_app, self.theme)
            self.window.set_theme(self.theme)
            if self.tray is not None:
                self.tray.set_theme(self.theme.name)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options of `moebar`."""
    parser = argparse.ArgumentParser(prog="moebar", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {moebar_version()}",
                        help="print the version and exit")
    parser.add_argument("--background", action="store_true",
                        help="start in the menu bar without opening the chat window")
    parser.add_argument("--no-tray", action="store_true", help="do not put an item in the menu bar")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the app until Quit (`moebar mcp ...` checks the MCP servers instead, without a GUI)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["mcp"]:
        from app.mcp.check import main as mcp_main

        return mcp_main(argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    exit_if_qt_cannot_start()  # a sentence with the apt line instead of Qt's abort
    qt_app = QtWidgets.QApplication(sys.argv[:1])
    qt_app.setApplicationName("MoeBar")
    qt_app.setApplicationDisplayName("MoeBar")
    qt_app.setWindowIcon(app_icon())
    hide_dock_icon()
    instance = SingleInstance(paths.data_dir())
    if not instance.claim():
        print("moebar: MoeBar is already running with this profile; its window was brought to the front.")
        return 0
    moebar = MoeBarApp(qt_app, use_tray=False if args.no_tray else None)
    instance.show_requested.connect(moebar.window.show_and_raise)
    qt_app.aboutToQuit.connect(instance.release)
    moebar.start(show_window=not args.background)
    return qt_app.exec()


if __name__ == "__main__":
    sys.exit(main())
