"""Several Macs from the app: the host list, the hostfile, the engine started as rank 0, each host's state."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from app.bridge import READY, EngineBridge
from app.settings import Settings, SettingsError, SettingsStore, load_settings, save_settings, validate_setting
from app.several_macs import (
    CONNECTED,
    EXIT_PEER_LOST,
    LOST,
    PEER_LOST,
    THIS_MAC,
    WAITING,
    HostListError,
    HostStates,
    engine_environment,
    hostfile_text,
    other_mac_command,
    parse_hosts,
    peer_lost_sentence,
    write_hostfile,
)

HOSTS = ("10.0.0.1:5100", "10.0.0.2:5100")
HOSTFILE_TEXT = '[["10.0.0.1:5100"], ["10.0.0.2:5100"]]'


# ------------------------------------------------------------------ the host list


def test_hosts_are_read_one_a_line_with_spaces_and_blank_lines_dropped() -> None:
    text = "  10.0.0.1:5100 \n\nstudio.local:05101\nfe80::1:5102\n"
    assert parse_hosts(text) == ("10.0.0.1:5100", "studio.local:5101", "fe80::1:5102")
    assert parse_hosts("") == ()


@pytest.mark.parametrize(("text", "message"), [
    ("10.0.0.1:5100\n10.0.0.2", "Line 2: '10.0.0.2' is not host:port"),
    ("10.0.0.1:5100\n\n10.0.0.2:0", "Line 3: '10.0.0.2:0' has no port from 1 to 65535"),
    ("10.0.0.1:5100\nmac two:5100", "Line 2: 'mac two' in 'mac two:5100' is not a host name or an IP address"),
    ("10.0.0.1:5100\n10.0.0.2:99999", "Line 2: '10.0.0.2:99999' has no port from 1 to 65535"),
    ("10.0.0.1:5100\n:5100", "Line 2: ':5100' is not host:port"),
    ("10.0.0.1:5100\nx:y", "Line 2: 'x:y' has no port"),
    ("10.0.0.1:5100\n10.0.0.2:5100\n10.0.0.1:5100", "Line 3: 10.0.0.1:5100 is already on line 1"),
])
def test_a_bad_line_is_refused_by_its_number(text: str, message: str) -> None:
    with pytest.raises(HostListError) as info:
        parse_hosts(text)
    assert message in str(info.value)


def test_more_than_sixteen_hosts_are_refused() -> None:
    with pytest.raises(HostListError, match="17 hosts: at most 16"):
        parse_hosts("\n".join(f"10.0.0.{i}:5100" for i in range(1, 18)))


def test_the_host_setting_is_checked_and_saved(tmp_path: Path) -> None:
    assert validate_setting("several_macs_hosts", [" 10.0.0.1:5100", "10.0.0.2:5100"]) == HOSTS
    with pytest.raises(SettingsError, match=r"'several_macs_hosts': Line 2: 'mac' is not host:port"):
        validate_setting("several_macs_hosts", ["10.0.0.1:5100", "mac"])
    with pytest.raises(SettingsError, match="must be a list of host:port"):
        validate_setting("several_macs_hosts", "10.0.0.1:5100")
    path = tmp_path / "settings.json"
    save_settings(path, Settings(several_macs_enabled=True, several_macs_hosts=HOSTS))
    assert json.loads(path.read_text())["several_macs_hosts"] == list(HOSTS)
    assert load_settings(path) == (Settings(several_macs_enabled=True, several_macs_hosts=HOSTS), [])
    path.write_text(json.dumps({"several_macs_hosts": ["10.0.0.1:5100", "10.0.0.1:5100"]}))
    loaded, warnings = load_settings(path)
    assert loaded.several_macs_hosts == ()
    assert len(warnings) == 1 and "Line 2: 10.0.0.1:5100 is already on line 1" in warnings[0]


# ------------------------------------------------------------------ hostfile, environment, commands


def test_the_hostfile_is_mlx_rings_list_one_entry_per_rank(tmp_path: Path) -> None:
    from engine.model.expert_parallel import hosts_from_file

    assert hostfile_text(HOSTS) == HOSTFILE_TEXT
    path = tmp_path / "config" / "hostfile.json"
    write_hostfile(path, HOSTS)
    assert path.read_text() == HOSTFILE_TEXT + "\n"
    assert hosts_from_file(path) == list(HOSTS)  # what the engine reads back


def test_the_engine_is_rank_zero_only_when_on_with_two_hosts(tmp_path: Path) -> None:
    hostfile = tmp_path / "hostfile.json"
    assert engine_environment(True, HOSTS, hostfile) == {"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    assert engine_environment(False, HOSTS, hostfile) == {}
    assert engine_environment(True, HOSTS[:1], hostfile) == {}


def test_the_app_and_the_engine_agree_on_the_lost_peer_signs() -> None:
    from engine.model.expert_parallel import EXIT_PEER_LOST as ENGINE_EXIT
    from engine.model.expert_parallel import PeerLostError

    assert (EXIT_PEER_LOST, PEER_LOST) == (ENGINE_EXIT, PeerLostError.code)


def test_the_command_for_another_mac_writes_the_same_hostfile_and_starts_its_rank(tmp_path: Path) -> None:
    from engine.model.expert_parallel import hosts_from_file

    hosts = (*HOSTS, "10.0.0.3:5100")
    command = other_mac_command(2, hosts)
    assert command == (
        """echo '[["10.0.0.1:5100"], ["10.0.0.2:5100"], ["10.0.0.3:5100"]]' > "$HOME/moebar-hosts.json"\n"""
        """MLX_RANK=2 MLX_HOSTFILE="$HOME/moebar-hosts.json" moebar-engine stdio""")
    with pytest.raises(ValueError):
        other_mac_command(0, hosts)  # rank 0 is this Mac
    # the first line, run by a shell, writes a hostfile the engine accepts
    subprocess.run(["sh", "-c", command.splitlines()[0]], env={"HOME": str(tmp_path)}, check=True)
    assert hosts_from_file(tmp_path / "moebar-hosts.json") == list(hosts)


def test_a_lost_peer_reads_as_a_sentence_naming_the_mac() -> None:
    assert peer_lost_sentence(HOSTS).startswith(
        "The Mac at 10.0.0.2:5100 stopped answering or cannot be reached, so the model stopped on every Mac.")
    three = peer_lost_sentence((*HOSTS, "10.0.0.3:5100"))
    assert three.startswith("One of the other Macs (10.0.0.2:5100, 10.0.0.3:5100) stopped answering")
    assert peer_lost_sentence(()).startswith("Another Mac running part of the model stopped answering")


def test_host_states_follow_the_engine() -> None:
    states = HostStates(HOSTS)
    assert [(r.state, r.detail) for r in states.rows()] == [(THIS_MAC, "this Mac"), (WAITING, "")]
    states.peer_lost("rank 0: connecting to the other ranks: no answer within 120 s")  # never connected yet
    assert states.rows()[1].state == WAITING and "no answer" in states.rows()[1].detail
    states.loaded(2)
    assert states.rows()[1].text() == "10.0.0.2:5100 — connected"
    states.peer_lost("rank 0 of 2: expert layer 3: lost")
    assert states.rows()[1].text() == "10.0.0.2:5100 — lost: rank 0 of 2: expert layer 3: lost"
    states.loaded(2)
    assert states.rows()[1].state == CONNECTED
    states.loaded(1)
    assert states.rows()[1].text() == "10.0.0.2:5100 — not connected: the engine runs on 1 rank"
    states.reset(())
    assert states.rows() == []


# ------------------------------------------------------------------ the app: engine, states, chat, panel


@pytest.fixture
def macs(qtbot, tmp_path: Path, fake_bridge: EngineBridge):
    """Settings switched on for two Macs, the controller, and the bridge on the scripted engine (not started)."""
    from app.ui.several_macs_panel import SeveralMacsController

    settings = SettingsStore(tmp_path / "settings.json")
    settings.update({"several_macs_enabled": True, "several_macs_hosts": list(HOSTS)})
    controller = SeveralMacsController(fake_bridge, settings, hostfile=tmp_path / "config" / "hostfile.json")
    return settings, controller, fake_bridge


def _state_texts(controller) -> list[str]:
    return [row.text() for row in controller.states.rows()]


def test_the_engine_starts_as_rank_zero_and_the_hosts_connect(qtbot, tmp_path: Path, macs) -> None:
    settings, controller, bridge = macs
    hostfile = tmp_path / "config" / "hostfile.json"
    assert hostfile.read_text() == HOSTFILE_TEXT + "\n"
    assert bridge.environment == {"MLX_RANK": "0", "MLX_HOSTFILE": str(hostfile)}
    assert _state_texts(controller) == ["10.0.0.1:5100 — rank 0: this Mac", "10.0.0.2:5100 — waiting"]
    bridge.load(tmp_path / "fake-model")
    qtbot.waitUntil(lambda: bridge.state == READY, timeout=10_000)
    assert bridge.model is not None and bridge.model.ranks == 2
    # the engine process itself got the variables (the scripted engine echoes them in its plan)
    assert (bridge.model.plan["mlx_rank"], bridge.model.plan["mlx_hostfile"]) == ("0", str(hostfile))
    assert _state_texts(controller)[1] == "10.0.0.2:5100 — connected"

    settings.set("several_macs_enabled", False)  # the engine restarts alone and loads the model again
    assert bridge.environment == {} and controller.states.rows() == []
    qtbot.waitUntil(lambda: bridge.model is not None and "mlx_rank" not in bridge.model.plan, timeout=10_000)
    assert bridge.model.ranks == 1


def test_a_lost_mac_is_named_in_the_chat_and_shown_lost(qtbot, tmp_path: Path, macs) -> None:
    from app.history import HistoryStore
    from app.tools import DroppedFiles
    from app.ui.chat_controller import ChatController

    settings, controller, bridge = macs
    history = HistoryStore(tmp_path / "history.sqlite3")
    chat = ChatController(bridge, settings, history, DroppedFiles())
    errors: list = []
    bridge.error.connect(errors.append)
    bridge.load(tmp_path / "fake-model")
    qtbot.waitUntil(lambda: bridge.state == READY, timeout=10_000)
    with qtbot.waitSignal(controller.states_changed, timeout=10_000,
                          check_params_cb=lambda *a: controller.states.rows()[1].state == LOST):
        chat.send("peer_lost")
    qtbot.waitUntil(lambda: bool(errors), timeout=10_000)
    assert _state_texts(controller)[1] == ("10.0.0.2:5100 — lost: rank 0 of 2: expert layer 3: [ring] Connection "
                                           "reset by peer; another rank stopped")
    sentence = peer_lost_sentence(HOSTS)
    assert [(e.code, e.message, e.usable) for e in errors] == [(PEER_LOST, sentence, False)]
    answer = [e for e in chat.entries if e.role == "assistant"][-1]
    qtbot.waitUntil(lambda: sentence in answer.note, timeout=10_000)
    assert "rank 0 of 2" not in answer.note
    # the engine is replaced (a lost peer leaves it unusable), loads again and the hosts connect again
    qtbot.waitUntil(lambda: _state_texts(controller)[1] == "10.0.0.2:5100 — connected", timeout=15_000)
    history.close()


def test_a_rank_ended_by_its_watchdog_is_a_lost_mac_too(qtbot, tmp_path: Path, macs) -> None:
    from engine.serving.protocol import ChatMessage, ChatRequest

    settings, controller, bridge = macs
    bridge.load(tmp_path / "fake-model")
    qtbot.waitUntil(lambda: bridge.state == READY, timeout=10_000)
    with qtbot.waitSignal(bridge.engine_lost, timeout=10_000) as lost:
        bridge.chat(ChatRequest(id="r1", messages=[ChatMessage(role="user", content="peer_exit")]))
    assert lost.args[0] == peer_lost_sentence(HOSTS)
    assert lost.args[1] == ["r1"]
    assert _state_texts(controller)[1].startswith("10.0.0.2:5100 — lost: error: rank 0/2: expert layer 1: no "
                                                  "answer within 120 s")


def test_the_panel_checks_the_hosts_and_shows_the_commands(qtbot, tmp_path: Path, macs) -> None:
    from app.ui.settings_dialog import SettingsDialog
    from app.ui.several_macs_panel import SeveralMacsPanel

    settings, controller, bridge = macs
    dialog = SettingsDialog(settings)
    qtbot.addWidget(dialog)
    panel = SeveralMacsPanel(settings, controller, dialog)
    dialog.add_section("Several Macs", panel, panel.problem)
    dialog.accepted.connect(panel.save)
    assert panel.hosts.toPlainText() == "10.0.0.1:5100\n10.0.0.2:5100" and panel.enabled.isChecked()
    assert [panel.state_list.item(i).text() for i in range(panel.state_list.count())] == [
        "10.0.0.1:5100 — rank 0: this Mac", "10.0.0.2:5100 — waiting"]
    assert panel.command_text() == (
        "# On the Mac at 10.0.0.2:5100 (rank 1):\n"
        f"echo '{HOSTFILE_TEXT}' > \"$HOME/moebar-hosts.json\"\n"
        "MLX_RANK=1 MLX_HOSTFILE=\"$HOME/moebar-hosts.json\" moebar-engine stdio")

    panel.hosts.setPlainText("10.0.0.1:5100\n10.0.0.2:5100\nstudio:")
    assert not panel.error.isHidden() and "Line 3: 'studio:' has no port" in panel.error.text()
    assert panel.command_text() == "" and not panel.copy.isEnabled()
    dialog.accept()  # refused: the dialog stays open with the reason, nothing is saved
    assert dialog.result() != dialog.DialogCode.Accepted and "Line 3" in dialog.error_label.text()
    assert settings.get("several_macs_hosts") == HOSTS

    panel.hosts.setPlainText("10.0.0.1:5100\n10.0.0.2:5100\nstudio.local:5100")
    assert panel.error.isHidden()
    assert "# On the Mac at studio.local:5100 (rank 2):\n" in panel.command_text()
    assert 'MLX_RANK=2 MLX_HOSTFILE="$HOME/moebar-hosts.json" moebar-engine stdio' in panel.command_text()
    dialog.accept()
    assert settings.get("several_macs_hosts") == (*HOSTS, "studio.local:5100")
    assert json.loads((tmp_path / "config" / "hostfile.json").read_text())[2] == ["studio.local:5100"]
    assert _state_texts(controller)[2] == "studio.local:5100 — waiting"


def test_switched_on_with_this_mac_alone_is_refused(qtbot, tmp_path: Path, macs) -> None:
    from app.ui.several_macs_panel import SeveralMacsPanel

    settings, controller, bridge = macs
    panel = SeveralMacsPanel(settings, controller)
    qtbot.addWidget(panel)
    panel.hosts.setPlainText("10.0.0.1:5100")
    assert "at least one other Mac" in (panel.problem() or "")
    panel.enabled.setChecked(False)
    assert panel.problem() is None
    panel.save()
    assert settings.get("several_macs_enabled") is False and settings.get("several_macs_hosts") == HOSTS[:1]
    assert bridge.environment == {}


def test_from_an_app_bundle_the_other_macs_run_the_bundles_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from app.ui import several_macs_panel

    monkeypatch.setattr(several_macs_panel, "is_frozen", lambda: True)
    assert several_macs_panel.other_mac_engine() == (sys.executable, "--engine-stdio")
    monkeypatch.setattr(several_macs_panel, "is_frozen", lambda: False)
    assert several_macs_panel.other_mac_engine() == ("moebar-engine", "stdio")


def test_new_hosts_restart_the_engine_and_an_answer_under_way_is_reported_cut_off(qtbot, tmp_path: Path,
                                                                                  macs) -> None:
    from engine.serving.protocol import ChatMessage, ChatRequest

    settings, controller, bridge = macs
    bridge.load(tmp_path / "fake-model")
    qtbot.waitUntil(lambda: bridge.state == READY, timeout=10_000)
    bridge.chat(ChatRequest(id="slow1", messages=[ChatMessage(role="user", content="slow")]))
    qtbot.waitUntil(lambda: bridge.state == "busy", timeout=10_000)
    with qtbot.waitSignal(bridge.engine_lost, timeout=10_000) as lost:
        settings.set("several_macs_hosts", [*HOSTS, "10.0.0.3:5100"])
    assert lost.args == ["The engine was restarted with the new Several Macs settings.", ["slow1"]]
    assert _state_texts(controller)[2] == "10.0.0.3:5100 — waiting"
    qtbot.waitUntil(lambda: bridge.model is not None and bridge.model.ranks == 3, timeout=10_000)
    assert _state_texts(controller)[1:] == ["10.0.0.2:5100 — connected", "10.0.0.3:5100 — connected"]
