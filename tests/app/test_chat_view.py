"""The chat view and its controller: Markdown with highlighted code, throttled streaming,
Stop / Regenerate / Edit / Delete, thinking collapsed, figures under answers, history kept."""

from __future__ import annotations

from app.qt import QtCore, QtGui
from app.ui.chat_view import ChatView
from app.ui.conversation import ChatEntry
from app.ui.markdown import MarkdownRenderer, copy_link_index
from engine.serving.protocol import MessageFigures


def answers(controller) -> list[ChatEntry]:
    return [e for e in controller.entries if e.role == "assistant"]


def test_markdown_highlights_code_escapes_html_and_offers_copy() -> None:
    rendered = MarkdownRenderer().render("Hi <script>x</script>\n\n```python\ndef f():\n    return 1\n```\n")
    assert "&lt;script&gt;" in rendered.html and "<script>" not in rendered.html
    assert rendered.code_blocks == ["def f():\n    return 1"]
    assert 'href="copy:0"' in rendered.html
    assert "<span style=" in rendered.html  # Pygments colours inline
    assert copy_link_index("copy:0") == 0 and copy_link_index("https://x") is None


def test_code_copy_link_puts_the_block_on_the_clipboard(qtbot) -> None:
    view = ChatView()
    qtbot.addWidget(view)
    entry = ChatEntry("assistant", "Run:\n\n```bash\necho hi\n```")
    view.add_entry(entry)
    widget = view.widget_for(entry.key)
    assert widget is not None
    widget.text_view.anchorClicked.emit(QtCore.QUrl("copy:0"))
    assert QtGui.QGuiApplication.clipboard().text() == "echo hi"


def test_streamed_tokens_repaint_at_a_throttled_rate(qtbot) -> None:
    view = ChatView()
    qtbot.addWidget(view)
    entry = ChatEntry("assistant", status="streaming")
    view.add_entry(entry)
    widget = view.widget_for(entry.key)
    before = widget.render_count
    for i in range(300):
        entry.content += f"word{i} "
        view.entry_changed(entry.key)
    view.flush()
    assert widget.text_view.source_text() == entry.content  # nothing lost
    assert widget.render_count - before <= 3  # 300 tokens, a handful of repaints


def test_full_turn_with_thinking_collapsed_and_figures(qtbot, main_window) -> None:
    controller = main_window.controller
    main_window.composer.input.setPlainText("hello")
    main_window.composer.send_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    answer = answers(controller)[-1]
    assert answer.content == "Echo: hello " and answer.status == "complete"
    widget = main_window.chat_view.widget_for(answer.key)
    assert widget.text_view.source_text() == "Echo: hello "
    assert widget.thinking_toggle.isVisible() and not widget.thinking_view.isVisible()
    widget.thinking_toggle.click()
    assert widget.thinking_view.isVisible()
    assert "decode" in widget.figures_label.text() and "experts read 14.2 MB" in widget.figures_label.text()
    assert main_window.composer.text() == ""
    stored = controller.history.get_conversation(controller.conversation_id).messages
    assert [(m.role, m.content, m.partial) for m in stored] == [
        ("user", "hello", False), ("assistant", "Echo: hello ", False)]
    assert stored[1].reasoning == "Thinking about it."


def test_stop_keeps_the_partial_answer_marked(qtbot, app_parts) -> None:
    controller = app_parts
    controller.send("slow")
    qtbot.waitUntil(lambda: len(answers(controller)[-1].content) > 6, timeout=10_000)
    controller.stop()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    answer = answers(controller)[-1]
    assert answer.status == "stopped" and answer.content.startswith("w0 w1 ")
    stored = controller.history.get_message(answer.stored_id)
    assert stored.partial and stored.figures["status"] == "stopped"
    assert stored.content == answer.content


def test_regenerate_edit_and_delete(qtbot, main_window) -> None:
    controller = main_window.controller
    controller.send("first")
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    old = answers(controller)[-1]
    main_window.chat_view.widget_for(old.key).regenerate_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy() and answers(controller)[-1] is not old, timeout=10_000)
    assert len(controller.entries) == 2 and main_window.chat_view.widget_for(old.key) is None

    user = controller.entries[0]
    widget = main_window.chat_view.widget_for(user.key)
    widget.edit_button.click()
    assert widget.is_editing()
    widget.editor.setPlainText("second")
    widget.save_edit_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    assert [e.content for e in controller.entries] == ["second", "Echo: second "]

    main_window.chat_view.widget_for(controller.entries[1].key).delete_button.click()
    assert [e.content for e in controller.entries] == ["second"]
    stored = controller.history.get_conversation(controller.conversation_id).messages
    assert [m.content for m in stored] == ["second"]


def test_engine_killed_mid_answer_keeps_the_conversation(qtbot, main_window) -> None:
    controller = main_window.controller
    controller.send("hello")
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    controller.send("crash")
    qtbot.waitUntil(lambda: answers(controller)[-1].status == "interrupted", timeout=15_000)
    partial = answers(controller)[-1]
    assert partial.content.startswith("partial answer")
    assert "killed (SIGKILL)" in partial.note
    widget = main_window.chat_view.widget_for(partial.key)
    assert "interrupted" in widget.status_label.text()
    assert main_window.notice_bar.level() == "warning"
    qtbot.waitUntil(lambda: main_window.bridge.state == "ready", timeout=15_000)
    qtbot.waitUntil(lambda: "loaded again" in main_window.notice_bar.text(), timeout=5_000)
    stored = controller.history.get_conversation(controller.conversation_id).messages
    assert [(m.role, m.content) for m in stored] == [
        ("user", "hello"), ("assistant", "Echo: hello "), ("user", "crash"), ("assistant", partial.content)]
    assert stored[-1].partial and stored[-1].figures["status"] == "interrupted"
    controller.send("after")  # the conversation goes on with the new engine
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    assert answers(controller)[-1].content == "Echo: after "


def test_reopened_conversation_shows_marks_and_figures(qtbot, main_window) -> None:
    controller = main_window.controller
    controller.send("hello")
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    first = controller.conversation_id
    controller.new_conversation()
    assert main_window.chat_view.message_widgets() == []
    controller.open_conversation(first)
    widgets = main_window.chat_view.message_widgets()
    assert [w.entry.content for w in widgets] == ["hello", "Echo: hello "]
    assert isinstance(widgets[1].entry.figures, MessageFigures)
    assert "decode" in widgets[1].figures_label.text()
