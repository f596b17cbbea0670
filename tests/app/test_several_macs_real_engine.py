"""Several Macs end to end on loopback: the app's real engine as rank 0 and a second rank started with
the very command the Settings panel shows, a tiny model answering from both, then the second rank killed."""

from __future__ import annotations

import os
import signal

import subprocess
import sys
from pathlib import Path

import pytest

from app.bridge import READY, EngineBridge
from app.history import HistoryStore
from app.settings import SettingsStore
from app.several_macs import LOST, peer_lost_sentence
from app.tools import DroppedFiles
from app.ui.chat_controller import ChatController
from app.ui.several_macs_panel import SeveralMacsController
from engine.diagnostics.ranks_bench import free_loopback_ports

LOAD_TIMEOUT_MS = 180_000  # two engines importing MLX and loading on 2 CPU cores


@pytest.mark.slow  # about 50 s here: two engines import MLX and load on 2 cores
def test_two_ranks_from_the_settings_answer_and_a_lost_rank_is_named(qtbot, tiny_model, tmp_path: Path,
                                                                     isolated_moebar_home: Path, monkeypatch) -> None:
    model = tiny_model("qwen3_moe", 4)
    for name in [n for n in os.environ if n.startswith("MLX_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("MOEBAR_COLLECTIVE_TIMEOUT_S", "60")
    hosts = [f"127.0.0.1:{port}" for port in free_loopback_ports(2)]
    settings = SettingsStore(tmp_path / "settings.json")
    settings.update({"temperature": 0.0, "max_tokens": 8, "thinking": False,
                     "several_macs_enabled": True, "several_macs_hosts": hosts})
    bridge = EngineBridge(log_path=tmp_path / "engine.log")  # the default command: the real engine
    macs = SeveralMacsController(bridge, settings, hostfile=tmp_path / "config" / "hostfile.json")
    history = HistoryStore(tmp_path / "history.sqlite3")
    chat = ChatController(bridge, settings, history, DroppedFiles())
    [(rank, host, command)] = macs.commands()
    assert (rank, host) == (1, hosts[1])
    other_home = tmp_path / "other-mac"
    other_home.mkdir()
    log = open(tmp_path / "rank1.log", "w")
    env = dict(os.environ, HOME=str(other_home), PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    follower = subprocess.Popen(["sh", "-c", command], env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        bridge.load(model)
        qtbot.waitUntil(lambda: bridge.state == READY, timeout=LOAD_TIMEOUT_MS)
        assert bridge.model is not None and bridge.model.ranks == 2
        assert [row.state for row in macs.states.rows()] == ["rank 0", "connected"]

        chat.send("Hello there")
        qtbot.waitUntil(lambda: not chat.is_busy(), timeout=60_000)
        assert chat.entries[-1].status == "complete" and chat.entries[-1].content

        settings.set("max_tokens", 4000)  # long enough to lose the other rank in the middle
        chat.send("Tell me a long story")
        answer = chat.entries[-1]
        qtbot.waitUntil(lambda: len(answer.content) >= 10, timeout=60_000)
        os.killpg(follower.pid, signal.SIGKILL)
        qtbot.waitUntil(lambda: macs.states.rows()[1].state == LOST, timeout=90_000)
        assert "rank 0 of 2" in macs.states.rows()[1].detail
        qtbot.waitUntil(lambda: peer_lost_sentence(tuple(hosts)) in answer.note, timeout=30_000)
    finally:
        if follower.poll() is None:
            os.killpg(follower.pid, signal.SIGKILL)
        follower.wait(timeout=30)
        log.close()
        bridge.shutdown()
        history.close()
