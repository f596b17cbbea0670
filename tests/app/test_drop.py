"""Drag and drop anywhere on the window: the overlay says what is accepted, accepted files become
chips on the message, refused ones say why."""

from __future__ import annotations

from pathlib import Path

from app.qt import Qt, QtCore, QtGui, QtWidgets
from app.ui.message_widget import FileChip


def mime_for(paths: list[Path]) -> QtCore.QMimeData:
    mime = QtCore.QMimeData()
    mime.setUrls([QtCore.QUrl.fromLocalFile(str(p)) for p in paths])
    return mime


def drag(target: QtWidgets.QWidget, mime: QtCore.QMimeData, kind: str) -> QtGui.QDropEvent:
    point = QtCore.QPoint(10, 10)
    action = Qt.DropAction.CopyAction
    if kind == "enter":
        event: QtGui.QDropEvent = QtGui.QDragEnterEvent(point, action, mime, Qt.MouseButton.LeftButton,
                                                         Qt.KeyboardModifier.NoModifier)
    else:
        event = QtGui.QDropEvent(QtCore.QPointF(point), action, mime, Qt.MouseButton.LeftButton,
                                 Qt.KeyboardModifier.NoModifier)
    QtWidgets.QApplication.sendEvent(target, event)
    return event


def sample_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.md"
    text.write_text("# Notes\nsome text\n")
    binary = tmp_path / "image.bin"
    binary.write_bytes(b"\x89PNG\x00\x00\x01\x02" * 100)
    big = tmp_path / "huge.log"
    with open(big, "wb") as handle:
        handle.truncate(65 * 1024 * 1024)  # sparse: over the 64 MB limit without writing it
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "main.py").write_text("print('hi')\n")
    return {"text": text, "binary": binary, "big": big, "folder": folder}


def test_overlay_appears_over_any_part_of_the_window(qtbot, main_window, tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    mime = mime_for([files["text"], files["binary"]])
    for target in (main_window.chat_view.viewport(), main_window.composer.input, main_window.sidebar.search_box):
        event = drag(target, mime, "enter")
        assert event.isAccepted()
        assert main_window.overlay.isVisible()
        assert main_window.overlay.geometry() == main_window.rect()
        assert "Text files up to 64.0 MB" in main_window.overlay.rules.text()
        assert "notes.md" in main_window.overlay.files.text() and "image.bin" in main_window.overlay.files.text()
        QtWidgets.QApplication.sendEvent(main_window, QtGui.QDragLeaveEvent())
        assert not main_window.overlay.isVisible()


def test_drag_without_files_is_refused(qtbot, main_window) -> None:
    mime = QtCore.QMimeData()
    mime.setText("just text")
    event = drag(main_window, mime, "enter")
    assert not event.isAccepted() and not main_window.overlay.isVisible()


def test_drop_adds_chips_and_explains_refusals(qtbot, main_window, tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    mime = mime_for(list(files.values()))
    drag(main_window, mime, "enter")
    drag(main_window, mime, "drop")
    assert not main_window.overlay.isVisible()
    qtbot.waitUntil(lambda: len(main_window.composer.attachments()) == 2, timeout=5000)
    names = sorted(a.name for a in main_window.composer.attachments())
    assert names == ["notes.md", "project"]
    notice = main_window.notice_bar.text()
    assert main_window.notice_bar.level() == "warning"
    assert "image.bin — not text (binary)" in notice and "huge.log — too big" in notice
    assert sorted(i.name for i in main_window.dropped.items()) == ["notes.md", "project"]

    controller = main_window.controller
    assert "notes.md" in controller._system_prompt()  # the model is told what it may open
    main_window.composer.input.setPlainText("summarise these")
    main_window.composer.send_button.click()
    user = controller.entries[0]
    assert [a.name for a in user.attachments] == ["notes.md", "project"]
    chips = main_window.chat_view.widget_for(user.key).findChildren(FileChip)
    assert sorted(c.text().split(" · ")[0] for c in chips) == ["notes.md", "project"]
    assert main_window.composer.attachments() == []  # chips moved onto the message
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    stored = controller.history.get_conversation(controller.conversation_id).messages[0]
    assert [a["name"] for a in stored.figures["attached"]] == ["notes.md", "project"]


def test_removing_a_chip_takes_the_file_away_from_the_tools(qtbot, main_window, tmp_path: Path) -> None:
    files = sample_files(tmp_path)
    main_window.add_files([str(files["text"])])
    qtbot.waitUntil(lambda: len(main_window.composer.attachments()) == 1, timeout=5000)
    main_window.composer.attachment_removed.emit("notes.md")
    assert main_window.composer.attachments() == [] and len(main_window.dropped) == 0
