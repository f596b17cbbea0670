"""Hostile model output through the real window: nothing the model writes may make Qt read a file,
a device or the network, and nothing may hang the window.

The model's text reaches the window as the answer, the thinking, a tool call's name, its argument
names and values, the tool's result (a dropped file's contents, an error quoting the name) and the
history sidebar (titles, search snippets). Every one of them gets HTML, Markdown and control
characters that point at trap FIFOs. A FIFO is the detector: a process outside this one opens
each trap for writing in a loop, which only succeeds while something holds it open for reading,
and counts the successes; Qt's C++ file reads never reach Python's audit hooks, so this is how a
read by Qt is seen at all (and the loop also unblocks such a read, so a regression fails the
test instead of hanging it). Python-level opens of the traps are recorded by an audit hook.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from app.qt import Qt, QtGui, QtWidgets
from app.ui.tool_card import ToolCallCard

pytestmark = pytest.mark.timeout(120, method="thread")  # a hang fails the test (the GUI thread may sit in C++)

_trap_paths: set[str] = set()
_trap_opens: list[str] = []


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _trap_paths and isinstance(args[0], (str, bytes)):
        path = args[0].decode(errors="replace") if isinstance(args[0], bytes) else args[0]
        if any(trap in path for trap in _trap_paths):
            _trap_opens.append(path)


sys.addaudithook(_audit)  # permanent; records only while a test has set traps

_WATCH = """
import os, sys, time
log, traps = sys.argv[1], sys.argv[2:]
while True:
    for trap in traps:
        try:
            fd = os.open(trap, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: nobody has it open for reading
            continue
        os.close(fd)
        with open(log, "a") as f:
            f.write(trap + "\\n")
    time.sleep(0.002)
"""


class Traps:
    """FIFOs that count every open for reading (by any code in this process), and a payload using them."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        self.paths = [folder / name for name in ("img", "file-url", "raw-img", "css", "table", "link", "ref")]
        for path in self.paths:
            os.mkfifo(path)
        self.log = folder.parent / "trap-opens.log"
        self.log.write_text("")
        self.watcher = subprocess.Popen([sys.executable, "-c", _WATCH, str(self.log), *map(str, self.paths)])

    def opened(self) -> list[str]:
        """Traps opened for reading so far (by Qt or Python), one line per open."""
        return self.log.read_text().split() + list(_trap_opens)

    def stop(self) -> None:
        self.watcher.kill()
        self.watcher.wait()

    def payload(self) -> str:
        img, file_url, raw_img, css, table, link, ref = (str(p) for p in self.paths)
        return "\n\n".join([
            f"zqxjtrap ![pic]({img}) ![pic2](file://{file_url}) ![by reference][r] ![](<{img}>)",
            f"[r]: {ref}",
            f'<img src="{raw_img}"> <IMG SRC=file://{raw_img}> <p style="background-image:url({css})">bg</p>',
            f'<table background="{table}"><tr><td>cell</td></tr></table> <link rel="stylesheet" href="{css}">',
            f"[link](file://{link}) <file://{link}> **bold `code <img src={raw_img}>`** &lt;img src={img}&gt;",
            f'```html\n<img src="{raw_img}">\n```',
            "control: \x00 \x07 \x1b[31mred\x1b[0m \u202egnp.exe \ufeff \r\n end & &amp; <b>bold?</b> \ud7ff",
            f"| a | ![t]({img}) |\n|---|---|\n| <img src={raw_img}> | x |",
            "```python\nunclosed <img src=" + img,
        ])  # fmt: skip


@pytest.fixture
def traps(tmp_path: Path) -> Iterator[Traps]:
    t = Traps(tmp_path / "traps")
    _trap_paths.update(str(p) for p in t.paths)
    _trap_opens.clear()
    yield t
    _trap_paths.clear()
    t.stop()


def _card(window: Any, call_id: str) -> ToolCallCard:
    cards = [w.cards[call_id] for w in window.chat_view.message_widgets() if call_id in w.cards]
    assert cards, f"no card for {call_id}"
    return cards[-1]


def _approve_and_finish(qtbot: Any, window: Any) -> None:
    controller = window.controller
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    call_id = controller.awaiting_calls()[0].id
    _card(window, call_id).approve_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)


def _show_everything(qtbot: Any, window: Any) -> None:
    """Unfold thinking and results, lay out and paint the whole window (where images would load)."""
    for widget in window.chat_view.message_widgets():
        if widget.thinking_toggle.isVisible() and not widget.thinking_toggle.isChecked():
            widget.thinking_toggle.click()
        for card in widget.cards.values():
            if card.result_toggle.isVisible() and not card.result_toggle.isChecked():
                card.result_toggle.click()
    QtWidgets.QApplication.processEvents()
    window.grab()
    qtbot.wait(200)  # let the trap watcher see any open that happened


def _documents(window: QtWidgets.QWidget) -> list[QtGui.QTextDocument]:
    views = window.findChildren(QtWidgets.QTextEdit) + window.findChildren(QtWidgets.QPlainTextEdit)
    return [view.document() for view in views]


def _image_count(document: QtGui.QTextDocument) -> int:
    count = 0
    block = document.begin()
    while block.isValid():
        it = block.begin()
        while not it.atEnd():
            if it.fragment().charFormat().isImageFormat():
                count += 1
            it += 1
        block = block.next()
    return count


def test_hostile_output_in_every_field_loads_nothing_and_shows_as_text(qtbot, main_window, traps: Traps,
                                                                      tmp_path: Path) -> None:
    window, controller = main_window, main_window.controller
    payload = traps.payload()
    evil = tmp_path / "evil.txt"
    evil.write_text(payload.replace("\x00", ""))  # a NUL byte would make it a binary file, refused
    assert controller.dropped.drop([evil])[0]

    # 1. Answer, thinking, tool name, argument names and values; the unknown tool's error quotes the name.
    assert controller.send("attack:" + payload)
    _approve_and_finish(qtbot, window)
    # 2. A tool result carrying the payload (a dropped file), which the next answer quotes.
    assert controller.send('tool:read_file {"path": "evil.txt"}')
    _approve_and_finish(qtbot, window)
    # 3. The history sidebar: the title and a search hit's snippet hold the payload.
    qtbot.keyClicks(window.sidebar.search_box, "zqxjtrap")
    qtbot.waitUntil(lambda: bool(window.sidebar.shown_ids()), timeout=5000)
    _show_everything(qtbot, window)

    assert traps.opened() == []
    widgets = window.chat_view.message_widgets()
    assistant = [w for w in widgets if w.entry.role == "assistant"]
    assert "zqxjtrap" in assistant[0].thinking_view.toPlainText()
    assert "zqxjtrap" in assistant[0].text_view.toPlainText() and "[image: pic]" in assistant[0].text_view.toPlainText()
    hostile_card = _card(window, "call_attack")
    assert hostile_card.state() == "error" and "no tool called" in hostile_card.result_text()
    assert any("zqxjtrap" in card.result_text() for w in widgets for card in w.cards.values() if card.state() == "done")
    assert "zqxjtrap" in assistant[-1].text_view.toPlainText()  # the answer quoting the file
    for document in _documents(window):
        assert _image_count(document) == 0, document.toHtml()[:500]
    for label in window.findChildren(QtWidgets.QLabel):
        text = label.text()
        if "<img" in text or "<IMG" in text:
            assert label.textFormat() == Qt.TextFormat.PlainText, (label.objectName(), text[:200])
    title = [label.text() for label in hostile_card.findChildren(QtWidgets.QLabel) if label.objectName() == "toolTitle"]
    assert title and "&lt;img" in title[0]  # the tool's name is shown, escaped, in its rich-text title
    tips = [w.toolTip() for w in window.findChildren(QtWidgets.QWidget)]
    sidebar_list = window.sidebar.list
    tips += [sidebar_list.item(i).toolTip() for i in range(sidebar_list.count())]
    assert any("zqxjtrap" in tip for tip in tips)
    for tip in tips:
        assert "<img" not in tip.lower() or not Qt.mightBeRichText(tip), tip[:200]


def test_markdown_images_become_placeholders_and_only_web_ones_links() -> None:
    from app.ui.markdown import MarkdownRenderer

    rendered = MarkdownRenderer().render(
        '![a "cat"](/dev/zero) ![web](https://example.org/x.png) ![](/dev/random) ![r][x]\n\n[x]: /dev/urandom'
    ).html
    assert "<img" not in rendered and not any(f"/dev/{name}" in rendered for name in ("zero", "random", "urandom"))
    assert "[image: a &quot;cat&quot;]" in rendered and "[image: no description]" in rendered
    assert '<a href="https://example.org/x.png">[image: web]</a>' in rendered


def test_text_view_loads_no_resource_even_from_markup_it_is_given(qtbot, traps: Traps) -> None:
    from app.ui.markdown import MarkdownRenderer
    from app.ui.text_view import FittedTextView

    view = FittedTextView(MarkdownRenderer())
    qtbot.addWidget(view)
    view.show()
    for trap in map(str, traps.paths):
        view.setHtml(f'<img src="{trap}"><p style="background-image:url({trap})">x</p>'
                     f'<table background="file://{trap}"><tr><td>a</td></tr></table>')
        QtWidgets.QApplication.processEvents()
        view.grab()
    time.sleep(0.2)
    assert traps.opened() == []
