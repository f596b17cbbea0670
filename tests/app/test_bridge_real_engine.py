"""EngineBridge against the real engine process (`python -m engine.serving.stdio_server`) on a tiny
random-weight model: a full turn, then SIGKILL mid-answer with restart, reload and nothing lost."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.bridge import READY, EngineBridge
from app.history import HistoryStore
from app.settings import SettingsStore
from app.tools import DroppedFiles
from app.ui.chat_controller import ChatController

LOAD_TIMEOUT_MS = 120_000  # MLX import and load on 2 CPU cores


@pytest.fixture
def real_controller(qtbot, tiny_model, tmp_path: Path, isolated_moebar_home: Path):
    model = tiny_model("qwen3_moe", 4)
    bridge = EngineBridge(log_path=tmp_path / "engine.log")  # the default command: the real engine
    settings = SettingsStore(tmp_path / "settings.json")
    settings.update({"temperature": 0.0, "max_tokens": 48, "thinking": False})
    history = HistoryStore(tmp_path / "history.sqlite3")
    controller = ChatController(bridge, settings, history, DroppedFiles())
    loaded: list[object] = []
    bridge.loaded.connect(loaded.append)
    bridge.load(model)
    qtbot.waitUntil(lambda: bridge.state == READY, timeout=LOAD_TIMEOUT_MS)
    yield controller, loaded, model
    bridge.shutdown()
    history.close()


def test_full_turn_then_sigkill_mid_answer_loses_nothing(qtbot, real_controller) -> None:
    controller, loaded, model = real_controller
    bridge: EngineBridge = controller.bridge
    assert loaded[0].model_dir == str(model) and loaded[0].plan  # the memory plan comes with it

    controller.send("Hello there")
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=60_000)
    first = controller.entries[-1]
    assert first.status == "complete" and first.content
    assert first.figures is not None and first.figures.generated_tokens > 0 and first.figures.bytes_read > 0

    controller.settings.set("max_tokens", 4000)  # long enough to be killed in the middle
    controller.send("Tell me a long story")
    answer = controller.entries[-1]
    qtbot.waitUntil(lambda: len(answer.content) >= 20, timeout=60_000)
    bridge.kill_engine()
    qtbot.waitUntil(lambda: answer.status == "interrupted", timeout=30_000)
    assert "SIGKILL" in answer.note and answer.content
    qtbot.waitUntil(lambda: len(loaded) == 2 and bridge.state == READY, timeout=LOAD_TIMEOUT_MS)
    assert loaded[1].model_dir == str(model)

    stored = controller.history.get_conversation(controller.conversation_id).messages
    assert [(m.role, m.content) for m in stored] == [(e.role, e.content) for e in controller.entries]
    assert [m.partial for m in stored] == [False, False, False, True]
    assert stored[-1].figures["status"] == "interrupted"

    controller.settings.set("max_tokens", 8)
    controller.send("Are you back?")  # the conversation goes on with the new engine
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=60_000)
    assert controller.entries[-1].status == "complete" and controller.entries[-1].content
    assert len(controller.entries) == 6
