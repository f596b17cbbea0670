"""The local server through the app's bridge on the real engine process: one model load serves the chat window
and HTTP clients at the same time, the bridge reports the requests running, and the server comes back when
the engine is restarted after a crash."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from app.bridge import READY, EngineBridge
from app.history import HistoryStore
from app.settings import SettingsStore
from app.tools import DroppedFiles
from app.ui.chat_controller import ChatController
from app.ui.local_server import server_status_text
from engine.serving.protocol import ServerEvent

LOAD_TIMEOUT_MS = 120_000  # MLX import and load on 2 CPU cores


@pytest.mark.slow  # two real engine starts, about a minute on 2 busy cores; tests/engine/test_app_server.py is the quick one
def test_app_and_http_share_the_engine_and_the_server_survives_a_restart(
        qtbot, tiny_model, tmp_path: Path, isolated_moebar_home: Path) -> None:
    bridge = EngineBridge(log_path=tmp_path / "engine.log")  # the real engine
    settings = SettingsStore(tmp_path / "settings.json")
    settings.update({"temperature": 0.0, "max_tokens": 40, "thinking": False})
    history = HistoryStore(tmp_path / "history.sqlite3")
    controller = ChatController(bridge, settings, history, DroppedFiles())
    states: list[ServerEvent] = []
    bridge.server_state.connect(states.append)
    loads: list[object] = []
    bridge.loaded.connect(loads.append)
    try:
        bridge.load(tiny_model("qwen3_moe", 4))
        bridge.serve(True, "127.0.0.1", 0, "k3y")
        qtbot.waitUntil(lambda: bridge.state == READY and bridge.server is not None and bridge.server.running,
                        timeout=LOAD_TIMEOUT_MS)
        base = f"http://127.0.0.1:{bridge.server.port}"
        auth = {"Authorization": "Bearer k3y"}
        model_id = httpx.get(f"{base}/v1/models", headers=auth).json()["data"][0]["id"]
        assert model_id == loads[0].name  # type: ignore[attr-defined]  # the app's model, loaded once

        answers: list[dict[str, object]] = []

        def ask() -> None:
            body = {"model": model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}
            answers.append(httpx.post(f"{base}/v1/chat/completions", json=body, headers=auth, timeout=120).json())

        controller.send("Tell me a story")  # the window's turn, then an HTTP request while it streams
        qtbot.waitUntil(lambda: bool(controller.entries[-1].content), timeout=60_000)
        client = threading.Thread(target=ask)
        client.start()
        qtbot.waitUntil(lambda: any(s.active_requests == 1 for s in states), timeout=60_000)
        running = next(s for s in states if s.active_requests == 1)
        assert server_status_text(running, True) == f"Local server: on at 127.0.0.1:{running.port} (1 request running)"
        qtbot.waitUntil(lambda: not controller.is_busy() and not client.is_alive(), timeout=120_000)
        assert controller.entries[-1].status == "complete"
        assert answers[0]["choices"][0]["message"]["content"]  # type: ignore[index]

        bridge.kill_engine()  # the server goes with the engine, and comes back with the restarted one
        qtbot.waitUntil(lambda: any(not s.running and "engine stopped" in s.error for s in states), timeout=30_000)
        count = len(states)
        qtbot.waitUntil(lambda: len(loads) == 2 and any(s.running for s in states[count:]), timeout=LOAD_TIMEOUT_MS)
        assert httpx.get(f"http://127.0.0.1:{bridge.server.port}/health").json()["status"] == "ok"
        bridge.serve(False)
        qtbot.waitUntil(lambda: not bridge.server.running, timeout=30_000)
    finally:
        bridge.shutdown()
        history.close()
