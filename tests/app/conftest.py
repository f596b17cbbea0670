"""Fixtures for the app tests: a bridge on the scripted engine, isolated settings and paths."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bridge import EngineBridge

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
FAKE_ENGINE_COMMAND = [sys.executable, str(FAKE_ENGINE)]


@pytest.fixture
def fake_engine_command() -> list[str]:
    """The command line that starts the scripted fake engine."""
    return list(FAKE_ENGINE_COMMAND)


@pytest.fixture
def isolated_moebar_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep settings, history and logs of a test in its own folder."""
    home = tmp_path / "moebar-home"
    monkeypatch.setenv("MOEBAR_HOME", str(home))
    return home


@pytest.fixture
def fake_bridge(qtbot: object, tmp_path: Path) -> Iterator[EngineBridge]:
    """An EngineBridge running the scripted fake engine (no model loaded yet).

    Earlier tests' widgets are deleted first: a QMainWindow's layout animation destroyed in the
    GUI thread while the bridge's thread started the engine process deadlocked the two (PySide6
    6.11: the destructor holds Qt's signal-slot lock and waits for the GIL, the bridge's thread
    holds the GIL and waits for that lock). The app's window is no longer a QMainWindow and runs
    no such animation (test_main_window); the flush stays for any other widget's deferred delete.
    """
    from app.qt import QtCore

    QtCore.QCoreApplication.sendPostedEvents(None, QtCore.QEvent.Type.DeferredDelete)
    bridge = EngineBridge(FAKE_ENGINE_COMMAND, log_path=tmp_path / "engine.log")
    yield bridge
    bridge.shutdown()


@pytest.fixture
def app_parts(qtbot, tmp_path: Path, isolated_moebar_home: Path, fake_bridge: EngineBridge):
    """Settings, history, dropped files and a chat controller on the scripted engine, model loaded."""
    from app.bridge import READY
    from app.history import HistoryStore
    from app.settings import SettingsStore
    from app.tools import DroppedFiles
    from app.ui.chat_controller import ChatController

    settings = SettingsStore(tmp_path / "settings.json")
    history = HistoryStore(tmp_path / "history.sqlite3")
    controller = ChatController(fake_bridge, settings, history, DroppedFiles())
    fake_bridge.load(tmp_path / "fake-model")
    qtbot.waitUntil(lambda: fake_bridge.state == READY, timeout=10_000)
    yield controller
    history.close()


@pytest.fixture
def main_window(qtbot, app_parts):
    """The chat window on the scripted engine."""
    from app.ui.main_window import MainWindow

    controller = app_parts
    window = MainWindow(controller, controller.bridge, controller.settings, controller.history)
    qtbot.addWidget(window)
    window.show()
    return window


@pytest.fixture
def moebar(qtbot, isolated_moebar_home: Path, fake_engine_command: list[str], tmp_path: Path) -> Iterator[object]:
    """The full app without a tray, a model folder configured, on the scripted engine, Ready.

    (tests/app/test_main_window.py has its own ``moebar``, with the tray.)
    """
    from app.bridge import READY
    from app.main import MoeBarApp
    from app.qt import QtWidgets
    from app.settings import SettingsStore

    SettingsStore().set("model_dir", str(tmp_path / "my-model"))
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=False)
    qtbot.addWidget(app.window)
    app.start()
    qtbot.waitUntil(lambda: app.bridge.state == READY, timeout=10_000)
    yield app
    app.shutdown()
    app.qt_app.setQuitOnLastWindowClosed(False)
