"""The whole app on the scripted engine: history sidebar (search, rename, delete, export),
settings persistence, the tray item and its menu, Quick Ask, and the model fallback."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from app.bridge import READY
from app.main import MoeBarApp
from app.qt import QtWidgets
from app.settings import SettingsStore
from app.ui.settings_dialog import SettingsDialog
from app.ui.tray import TrayController, tray_state_for
from engine.serving.protocol import LiveFigures, StatsEvent


@pytest.fixture
def moebar(qtbot, isolated_moebar_home: Path, fake_engine_command: list[str], tmp_path: Path):
    """The full app with a model folder configured and the scripted engine."""
    SettingsStore().set("model_dir", str(tmp_path / "my-model"))
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=True)
    qtbot.addWidget(app.window)
    app.start()
    qtbot.waitUntil(lambda: app.bridge.state == READY, timeout=10_000)
    yield app
    app.shutdown()


def chat(qtbot, app: MoeBarApp, text: str) -> None:
    assert app.controller.send(text)
    qtbot.waitUntil(lambda: not app.controller.is_busy(), timeout=10_000)


def test_window_shows_model_and_gauges(qtbot, moebar: MoeBarApp) -> None:
    window = moebar.window
    assert window.model_panel.name_label.text() == "my-model"
    assert "Ready · my-model" in window.state_label.text()
    assert not moebar.qt_app.quitOnLastWindowClosed()  # with a tray, closing the window keeps the app
    chat(qtbot, moebar, "slow")
    qtbot.waitUntil(lambda: window.model_panel.gauges.value_text("decode") == "12.5 tok/s", timeout=5000)


def test_history_search_rename_delete_export(qtbot, moebar: MoeBarApp, tmp_path: Path) -> None:
    sidebar, controller = moebar.window.sidebar, moebar.controller
    chat(qtbot, moebar, "tell me about pelicans")
    first = controller.conversation_id
    controller.new_conversation()
    chat(qtbot, moebar, "and now about walruses")
    second = controller.conversation_id
    assert sidebar.shown_ids() == [second, first]
    assert sidebar.selected_id() == second

    qtbot.keyClicks(sidebar.search_box, "pelic")
    qtbot.waitUntil(lambda: sidebar.shown_ids() == [first], timeout=2000)
    sidebar.list.itemClicked.emit(sidebar.list.item(0))
    assert controller.conversation_id == first
    assert [w.entry.content for w in moebar.window.chat_view.message_widgets()][0] == "tell me about pelicans"
    sidebar.search_box.clear()
    qtbot.keyClicks(sidebar.search_box, "zebra")
    qtbot.waitUntil(lambda: sidebar.empty_label.isVisible(), timeout=2000)
    assert "zebra" in sidebar.empty_label.text()
    sidebar.search_box.clear()
    qtbot.waitUntil(lambda: len(sidebar.shown_ids()) == 2, timeout=2000)

    sidebar.rename(first, "Birds")
    assert sidebar.list.item(sidebar.shown_ids().index(first)).text().startswith("Birds")
    out = tmp_path / "birds.md"
    sidebar.export(first, out)
    exported = out.read_text()
    assert exported.startswith("# Birds") and "tell me about pelicans" in exported and "Echo:" in exported

    sidebar.delete(first)  # the open conversation: the window starts a new chat
    assert sidebar.shown_ids() == [second]
    assert controller.conversation_id is None and moebar.window.chat_view.message_widgets() == []


def test_settings_dialog_values_persist(qtbot, moebar: MoeBarApp) -> None:
    dialog = SettingsDialog(moebar.settings, trained_k=8)
    qtbot.addWidget(dialog)
    dialog.system_prompt.setPlainText("Answer briefly.")
    dialog.temperature.setValue(0.3)
    dialog.max_tokens.setValue(512)
    dialog.thinking.setChecked(False)
    dialog.theme.setCurrentIndex(dialog.theme.findData("dark"))
    dialog.experts_per_token.setValue(4)
    assert dialog.k_warning.isVisibleTo(dialog)  # K below the trained 8 warns
    dialog.accept()
    reread = SettingsStore(moebar.settings.path).settings
    assert (reread.system_prompt, reread.temperature, reread.max_tokens, reread.thinking, reread.theme,
            reread.experts_per_token) == ("Answer briefly.", 0.3, 512, False, "dark", 4)
    assert moebar.theme.name == "dark"  # applied at once
    qtbot.waitUntil(lambda: moebar.bridge.state == READY, timeout=10_000)  # engine settings reload the model


def test_tray_shows_state_and_live_figures(qtbot, moebar: MoeBarApp) -> None:
    tray = moebar.tray
    assert isinstance(tray, TrayController)
    assert tray.state() == "idle"
    assert tray.model_action.text() == "Model: my-model"
    moebar.controller.send("slow")
    qtbot.waitUntil(lambda: tray.state() == "working", timeout=5000)
    moebar.bridge.stats.emit(StatsEvent(figures=LiveFigures(decode_tps=3.25, engine_read_bps=2e9,
                                                            pressure_level="warning")))
    tray.refresh_menu()
    assert tray.decode_action.text() == "Decode: 3.25 tok/s"
    assert tray.ssd_action.text() == "SSD read: 2.0 GB/s"
    assert tray.pressure_action.text() == "Memory pressure: warning"
    moebar.controller.stop()
    qtbot.waitUntil(lambda: tray.state() == "idle", timeout=5000)
    moebar.bridge.gave_up.emit("The engine crashed (SIGSEGV).")
    assert tray.state() == "error" and "SIGSEGV" in tray.icon.toolTip()
    assert tray_state_for("loading") == "working" and tray_state_for("failed") == "error"
    tray.open_action.trigger()
    assert moebar.window.isVisible()
    tray.quick_action.trigger()
    assert moebar.quick_ask.isVisible()


def test_quick_ask_answers_and_opens_in_chat(qtbot, moebar: MoeBarApp) -> None:
    quick = moebar.quick_ask
    quick.popup()
    qtbot.keyClicks(quick.input, "what time is it")
    qtbot.keyClick(quick.input, "\r")
    qtbot.waitUntil(lambda: not quick.is_answering() and quick.open_button.isVisibleTo(quick), timeout=10_000)
    assert quick.answer_view.source_text() == "Echo: what time is it "
    quick.open_button.click()
    assert moebar.controller.conversation_id == quick.conversation_id
    assert [e.content for e in moebar.controller.entries] == ["what time is it", "Echo: what time is it "]


def test_without_tray_closing_the_window_quits(qtbot, isolated_moebar_home: Path, fake_engine_command, tmp_path) -> None:
    SettingsStore().set("model_dir", str(tmp_path / "m"))
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=False)
    try:
        assert app.tray is None and app.qt_app.quitOnLastWindowClosed()
        app.start(show_window=False)  # no tray: the window shows anyway
        assert app.window.isVisible()
    finally:
        app.shutdown()
        app.qt_app.setQuitOnLastWindowClosed(False)


def test_demo_model_is_offered_when_none_is_configured(qtbot, isolated_moebar_home, fake_engine_command,
                                                       tmp_path, monkeypatch) -> None:
    built = tmp_path / "demo-model"
    monkeypatch.setattr("app.ui.model_manager.build_demo_model", lambda: built)
    app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=False)
    try:
        app.start()
        qtbot.waitUntil(lambda: app.bridge.state == READY, timeout=10_000)
        assert app.bridge.model.model_dir == str(built)
        assert "demo model" in app.window.chat_view.placeholder.text()
        assert "random weights" in app.window.model_panel.note_label.text()
    finally:
        app.shutdown()


def test_model_dialog_shows_the_plan_before_loading(qtbot, moebar: MoeBarApp, tiny_model) -> None:
    from app.ui.model_dialog import ModelDialog

    model = tiny_model("qwen3_moe", 4)
    dialog = ModelDialog(moebar.settings, moebar.models, moebar.window)
    qtbot.addWidget(dialog)
    dialog.folder_edit.setText(str(model))
    dialog.folder_radio.setChecked(True)
    dialog.folder_edit.editingFinished.emit()
    qtbot.waitUntil(lambda: "Resident (dense weights)" in dialog.plan_view.text(), timeout=60_000)
    assert "Streamed from disk (experts)" in dialog.plan_view.text()
    dialog.folder_edit.setText(str(model.parent))  # not a model folder: refused with the reason
    dialog.accept()
    assert "no config.json" in dialog.error_label.text()
    dialog.folder_edit.setText(str(model))
    dialog.accept()
    assert moebar.settings.get("model_dir") == str(model)


def test_the_window_runs_no_layout_animations(qtbot, moebar: MoeBarApp) -> None:
    """QMainWindow animated its central widget on every relayout; deleting such an animation while
    the bridge's thread held the GIL deadlocked the app (PySide6). The window is no QMainWindow."""
    from app.qt import QtCore

    window = moebar.window
    window.show()
    for size in ((900, 600), (1200, 800), (1000, 700)):
        window.resize(*size)
        qtbot.wait(30)
        assert window.findChildren(QtCore.QPropertyAnimation) == []
    assert not isinstance(window, QtWidgets.QMainWindow)
    assert window.toolbar.actions()[0].text() == "New chat"
    assert [m.title() for m in window.menu_bar.findChildren(QtWidgets.QMenu)] == ["Help"]
    assert window.status_bar.isVisibleTo(window) and window.state_label.text()
