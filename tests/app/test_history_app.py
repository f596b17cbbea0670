"""A damaged history database at app start: the window says so and where the file went, the
damaged file is kept byte for byte, and the app chats and saves into a fresh history."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from app import paths
from app.bridge import READY
from app.main import MoeBarApp
from app.qt import QtWidgets
from app.settings import SettingsStore


def test_damaged_history_is_moved_aside_with_a_notice_and_the_app_goes_on(
    qtbot: Any, isolated_moebar_home: Path, fake_engine_command: list[str], tmp_path: Path
) -> None:
    history_path = paths.history_db_path()
    history_path.parent.mkdir(parents=True, exist_ok=True)
    garbage = b"SQLite format 3\x00" + os.urandom(5000)  # looks like SQLite, is not
    history_path.write_bytes(garbage)
    SettingsStore().set("model_dir", str(tmp_path / "model"))
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=False)
    try:
        qtbot.addWidget(app.window)
        app.start()
        [moved] = list(history_path.parent.glob(history_path.name + ".corrupt-*"))
        assert moved.read_bytes() == garbage  # kept as it was, not replaced or repaired
        notice = app.window.notice_bar
        assert notice.level() == "error"
        assert "damaged" in notice.text() and str(moved) in notice.text(), notice.text()
        assert app.history is not None
        qtbot.waitUntil(lambda: app.bridge.state == READY, timeout=10_000)
        assert app.controller.send("hello after the damage")
        qtbot.waitUntil(lambda: not app.controller.is_busy(), timeout=10_000)
        [summary] = app.history.list_conversations()
        stored = app.history.get_conversation(summary.id).messages
        assert [m.content for m in stored] == ["hello after the damage", "Echo: hello after the damage "]
    finally:
        app.shutdown()
        app.qt_app.setQuitOnLastWindowClosed(False)
    assert moved.read_bytes() == garbage
