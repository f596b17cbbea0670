"""The real engine running out of memory in the middle of an answer, seen from the chat window.

The engine reports the MemoryError as an error with usable=false; the bridge replaces the
process, the model is loaded again, the answer so far is kept and marked in the window and in
SQLite, and the conversation goes on. (SIGKILL mid-answer on the real engine is in
test_bridge_real_engine.py; exits on the scripted engine in test_bridge.py and test_chat_view.py.)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from app.bridge import READY, EngineBridge
from app.history import HistoryStore
from app.settings import SettingsStore
from app.tools import DroppedFiles
from app.ui.chat_controller import ChatController
from app.ui.main_window import MainWindow

OOM_ENGINE = [sys.executable, str(Path(__file__).with_name("oom_engine.py"))]
LOAD_TIMEOUT_MS = 180_000  # MLX import and load on 2 busy CPU cores


def test_out_of_memory_mid_answer_keeps_the_conversation(
    qtbot: Any, tiny_model: Any, tmp_path: Path, isolated_moebar_home: Path
) -> None:
    model = tiny_model("qwen3_moe", 4)
    bridge = EngineBridge(OOM_ENGINE, log_path=tmp_path / "engine.log")
    settings = SettingsStore(tmp_path / "settings.json")
    settings.update({"temperature": 0.0, "max_tokens": 24, "thinking": False})
    history = HistoryStore(tmp_path / "history.sqlite3")
    controller = ChatController(bridge, settings, history, DroppedFiles())
    window = MainWindow(controller, bridge, settings, history)
    qtbot.addWidget(window)
    window.show()
    loaded: list[Any] = []
    pids: list[int] = []
    bridge.loaded.connect(loaded.append)
    bridge.hello.connect(pids.append)
    try:
        bridge.load(model)
        qtbot.waitUntil(lambda: bridge.state == READY and len(loaded) == 1, timeout=LOAD_TIMEOUT_MS)
        assert controller.send("Hello there")
        qtbot.waitUntil(lambda: not controller.is_busy(), timeout=LOAD_TIMEOUT_MS)
        assert controller.entries[-1].status == "complete"

        assert controller.send("oom")
        answer = controller.entries[-1]
        qtbot.waitUntil(lambda: not controller.is_busy() and answer.status != "streaming", timeout=60_000)
        assert answer.content  # the pieces that came before the failure
        assert answer.status in ("interrupted", "error"), answer.status
        assert "out of memory (MemoryError: std::bad_alloc" in answer.note, answer.note
        status = window.chat_view.widget_for(answer.key).status_label.text()
        assert "MemoryError" in status, status

        # the engine said it cannot go on: a new process, the same model loaded again
        qtbot.waitUntil(lambda: len(loaded) == 2 and bridge.state == READY, timeout=LOAD_TIMEOUT_MS)
        assert len(set(pids)) == 2 and loaded[1].model_dir == str(model)
        qtbot.waitUntil(lambda: "loaded again" in window.notice_bar.text(), timeout=10_000)

        stored = history.get_conversation(controller.conversation_id).messages  # type: ignore[arg-type]
        assert [(m.role, m.content) for m in stored] == [(e.role, e.content) for e in controller.entries]
        assert [m.partial for m in stored] == [False, False, False, True]
        assert stored[-1].figures["status"] == answer.status

        assert controller.send("Are you back?")  # the conversation goes on with the new engine
        qtbot.waitUntil(lambda: not controller.is_busy(), timeout=LOAD_TIMEOUT_MS)
        assert controller.entries[-1].status == "complete" and controller.entries[-1].content
        assert len(history.get_conversation(controller.conversation_id).messages) == 6  # type: ignore[arg-type]
    finally:
        bridge.shutdown()
        history.close()
