"""Quick Ask keeps its width while text streams, has Stop, and shows in the sidebar at once."""

from __future__ import annotations

from app.main import MoeBarApp

from app.qt import Qt
from app.ui.history_sidebar import ID_ROLE
from app.ui.quick_ask import WIDTH


def sidebar_ids(app: MoeBarApp) -> list[int]:
    items = [app.window.sidebar.list.item(i) for i in range(app.window.sidebar.list.count())]
    return [int(item.data(ID_ROLE)) for item in items if item is not None and item.data(ID_ROLE) is not None]


def test_quick_ask_keeps_its_width_stops_and_shows_in_the_sidebar(qtbot, moebar: MoeBarApp) -> None:  # noqa: F811
    quick = moebar.quick_ask
    quick.popup()
    assert quick.width() == WIDTH and quick.stop_button.isHidden()
    qtbot.keyClicks(quick.input, "slow")  # the scripted engine answers with 100 tokens, 30 ms apart
    qtbot.keyClick(quick.input, Qt.Key.Key_Return)
    qtbot.waitUntil(lambda: quick.conversation_id != 0, timeout=10_000)
    assert quick.conversation_id in sidebar_ids(moebar)  # at once, not after some later refresh
    qtbot.waitUntil(lambda: len(quick.answer_view.source_text().split()) >= 10, timeout=10_000)
    assert quick.stop_button.isVisible() and quick.width() >= WIDTH
    quick.stop_button.click()
    qtbot.waitUntil(lambda: not quick.is_answering(), timeout=10_000)
    assert quick.status.text().startswith("Stopped · ") and quick.stop_button.isHidden()
    assert len(quick.answer_view.source_text().split()) < 100 and quick.width() >= WIDTH
    stored = moebar.history.get_conversation(quick.conversation_id).messages  # type: ignore[union-attr]
    assert [m.role for m in stored] == ["user", "assistant"] and stored[1].content.startswith("w0 w1")
