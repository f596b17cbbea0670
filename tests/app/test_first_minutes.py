"""The walls a new user hit in the first minutes: a message sent before the model is ready, a
broken folder chosen while a model works, and the Model dialog's Load button and Enter key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from app.bridge import READY, EngineBridge
from app.history import HistoryStore
from app.main import MoeBarApp
from app.qt import Qt, QtWidgets
from app.settings import SettingsStore
from app.tools import DroppedFiles
from app.ui.chat_controller import ChatController


def test_a_message_sent_before_ready_waits_and_is_answered(qtbot, tmp_path: Path, isolated_moebar_home: Path,
                                                            fake_bridge: EngineBridge) -> None:
    settings = SettingsStore(tmp_path / "settings.json")
    history = HistoryStore(tmp_path / "history.sqlite3")
    controller = ChatController(fake_bridge, settings, history, DroppedFiles())
    notices: list[tuple[str, str]] = []
    controller.notice.connect(lambda level, text: notices.append((level, text)))
    try:
        assert controller.send("hello early")  # no engine, no model yet
        assert controller.is_busy() and controller.is_waiting_for_model()
        assert notices and notices[-1][0] == "info" and "sent as soon as" in notices[-1][1]
        assert [e.role for e in controller.entries] == ["user"]  # no failed turn
        fake_bridge.load(tmp_path / "fake-model")
        qtbot.waitUntil(lambda: len(controller.entries) == 2 and not controller.is_busy(), timeout=10_000)
        answer = controller.entries[-1]
        assert answer.status == "complete" and answer.content == "Echo: hello early "
        assert all(level != "error" for level, _ in notices)
        stored = history.get_conversation(controller.conversation_id).messages  # type: ignore[arg-type]
        assert [m.role for m in stored] == ["user", "assistant"]
    finally:
        history.close()


def test_stop_while_waiting_keeps_the_message_and_sends_nothing(qtbot, tmp_path: Path, isolated_moebar_home: Path,
                                                                fake_bridge: EngineBridge) -> None:
    controller = ChatController(fake_bridge, SettingsStore(tmp_path / "s.json"), None, DroppedFiles())
    assert controller.send("never mind")
    controller.stop()
    assert not controller.is_busy()
    fake_bridge.load(tmp_path / "fake-model")
    qtbot.waitUntil(lambda: fake_bridge.state == READY, timeout=10_000)
    qtbot.wait(100)
    assert [e.role for e in controller.entries] == ["user"]




def test_a_folder_that_fails_to_load_gives_the_working_model_back(qtbot, moebar: MoeBarApp, tmp_path: Path) -> None:
    window = moebar.window
    moebar.window.model_panel.set_note("Demo model: random weights, so the answers are gibberish.")
    moebar.settings.set("model_dir", str(tmp_path / "bad-model"))  # the fake engine fails folders named bad*
    qtbot.waitUntil(lambda: "is loaded again" in window.notice_bar.text(), timeout=10_000)
    text = window.notice_bar.text()
    assert text.startswith("Could not load bad-model: ") and "truncated safetensors file" in text
    assert "load request" not in text and ".." not in text
    qtbot.waitUntil(lambda: moebar.bridge.state == READY and moebar.bridge.model is not None, timeout=10_000)
    assert moebar.bridge.model.name == "my-model" and moebar.settings.get("model_dir") == str(tmp_path / "my-model")
    assert window.model_panel.name_label.text() == "my-model"
    assert window.model_panel.note_label.isHidden()  # the stale demo note went with the unloaded model
    assert moebar.controller.send("still answering?")
    qtbot.waitUntil(lambda: not moebar.controller.is_busy(), timeout=10_000)
    assert moebar.controller.entries[-1].content == "Echo: still answering? "


def fake_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    """Memory plans without the engine subprocess: folders named bad* fail their checks."""
    def plan_op(parent: Any, folder: Path, options: Any, on_plan: Callable[[dict[str, Any]], None],
                on_error: Callable[[BaseException], None]) -> None:
        if folder.name.startswith("bad"):
            on_error(RuntimeError(f"Could not check {folder}: model.safetensors is truncated."))
        else:
            on_plan({"dense_bytes": 1000, "expert_bytes_total": 5000})

    monkeypatch.setattr("app.ui.model_dialog.plan_op", plan_op)


def test_model_dialog_never_loads_a_folder_that_failed_its_checks(qtbot, moebar: MoeBarApp, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from app.ui.model_dialog import ModelDialog

    fake_plans(monkeypatch)
    bad, good = tmp_path / "bad-model", tmp_path / "good-model"
    for folder in (bad, good):
        folder.mkdir()
        (folder / "config.json").write_text("{}")
    dialog = ModelDialog(moebar.settings, moebar.models, moebar.window)
    qtbot.addWidget(dialog)
    dialog.show()
    dialog.folder_radio.setChecked(True)
    dialog.folder_edit.setText(str(bad))
    dialog.folder_edit.setFocus()
    qtbot.keyClick(dialog.folder_edit, Qt.Key.Key_Return)  # Enter checks the folder, never loads it
    assert "cannot be loaded" in dialog.error_label.text() and not dialog.load_button.isEnabled()
    assert dialog.isVisible() and dialog.result() != QtWidgets.QDialog.DialogCode.Accepted
    dialog.accept()  # even called directly (e.g. a default button), a failed folder is refused
    assert dialog.isVisible() and moebar.settings.get("model_dir") == str(tmp_path / "my-model")
    dialog.folder_edit.setText(str(good))
    qtbot.keyClick(dialog.folder_edit, Qt.Key.Key_Return)
    assert dialog.load_button.isEnabled() and dialog.error_label.text() == ""
    dialog.load_button.click()
    assert moebar.settings.get("model_dir") == str(good)
