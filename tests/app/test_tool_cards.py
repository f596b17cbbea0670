"""Tool calls as inline cards: arguments shown before approval, approve / always / deny,
running in a worker, result collapsed, and the answer continuing with the result."""

from __future__ import annotations

import threading
from pathlib import Path

from app.qt import Qt
from app.tools import ToolRegistry
from app.ui.tool_card import ToolCallCard
from engine.serving.protocol import ToolCall


def drop_notes(controller, tmp_path: Path) -> Path:
    notes = tmp_path / "notes.txt"
    notes.write_text("hello notes\n")
    accepted, rejected = controller.dropped.drop([notes])
    assert accepted and not rejected
    return notes


def card_of(window, call_id: str = "call_1") -> ToolCallCard:
    for widget in window.chat_view.message_widgets():
        if call_id in widget.cards:
            return widget.cards[call_id]
    raise AssertionError(f"no card for {call_id}")


def test_card_shows_full_arguments_then_states(qtbot) -> None:
    arguments = {"path": "project/src/main.py", "start_line": 10, "end_line": 400}
    card = ToolCallCard(ToolCall(id="c", name="read_file", arguments=arguments))
    qtbot.addWidget(card)
    card.show()
    text = card.arguments_view.toPlainText()
    assert all(str(v) in text for v in arguments.values())
    assert card.approve_button.isVisible() and card.deny_button.isVisible()
    card.set_state("running")
    assert not card.approve_button.isVisible() and card.state_label.text() == "Running…"
    card.set_state("done", "x" * 500)
    assert card.result_toggle.isVisible() and not card.result_view.isVisible()  # collapsed
    card.result_toggle.click()
    assert card.result_view.isVisible() and card.result_text() == "x" * 500


def test_tool_call_round_trip(qtbot, main_window, tmp_path: Path, monkeypatch) -> None:
    controller = main_window.controller
    drop_notes(controller, tmp_path)
    ran_in: list[int] = []
    real_run = ToolRegistry.run

    def spy(self, name, arguments=None):
        ran_in.append(threading.get_ident())
        return real_run(self, name, arguments)

    monkeypatch.setattr(ToolRegistry, "run", spy)
    sent = []
    main_window.bridge.done.connect(lambda event: sent.append(event.finish_reason))
    controller.send("tool:read_file")
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    card = card_of(main_window)
    assert card.state() == "awaiting" and '"notes.txt"' in card.arguments_view.toPlainText()
    assert main_window.composer.send_button.text() == "Stop"  # busy while the call waits
    qtbot.mouseClick(card.approve_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: card.state() == "done", timeout=10_000)
    assert ran_in and ran_in[0] != threading.get_ident()  # ran in a worker thread
    assert "hello notes" in card.result_text() and not card.is_result_expanded()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    roles = [e.role for e in controller.entries]
    assert roles == ["user", "assistant", "tool", "assistant"]
    assert controller.entries[1].tool_calls[0].name == "read_file"
    assert "The tool said:" in controller.entries[-1].content and "hello notes" in controller.entries[-1].content
    assert sent == ["tool_calls", "stop"]
    stored = controller.history.get_conversation(controller.conversation_id).messages
    assert [m.role for m in stored] == roles
    assert stored[1].tool_calls[0]["name"] == "read_file" and stored[2].tool_call_id == "call_1"


def test_deny_sends_the_refusal_back(qtbot, main_window, tmp_path: Path) -> None:
    controller = main_window.controller
    drop_notes(controller, tmp_path)
    controller.send("tool:read_file")
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    card_of(main_window).deny_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    assert card_of(main_window).state() == "denied"
    assert "denied" in controller.entries[-1].content


def test_always_allow_is_remembered_and_skips_the_question(qtbot, main_window, tmp_path: Path) -> None:
    controller = main_window.controller
    drop_notes(controller, tmp_path)
    controller.send("tool:file_info")
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    card_of(main_window).always_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    assert "file_info" in controller.settings.get("always_approved_tools")
    controller.send("tool:file_info")  # second time: runs without asking
    qtbot.waitUntil(lambda: len([e for e in controller.entries if e.role == "tool"]) == 2, timeout=10_000)
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    assert controller.entries[-1].role == "assistant" and "The tool said:" in controller.entries[-1].content


def test_tool_error_is_shown_and_returned(qtbot, main_window, tmp_path: Path) -> None:
    controller = main_window.controller
    drop_notes(controller, tmp_path)
    controller.send("tool:no_such_tool")
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    card_of(main_window).approve_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    card = card_of(main_window)
    assert card.state() == "error" and "no tool called" in card.result_text()
    assert controller.entries[-1].content.startswith("The tool said: Error:")
