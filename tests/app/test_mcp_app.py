"""The whole app with MCP servers (a real MCPServer over stdio), the tray's model picker and the local server switch.

The engine is the scripted fake (tests/app/fake_engine.py); the real engine's local server is
tested in tests/engine/test_app_server.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from app import paths
from app.bridge import READY
from app.main import MoeBarApp
from app.mcp.servers_panel import McpServersPanel
from app.qt import QtWidgets
from app.settings import SettingsStore
from app.ui.local_server import LocalServerPanel
from app.ui.tool_card import ToolCallCard
from engine.serving.protocol import ChatRequest

TOOL_SERVER = str(Path(__file__).with_name("mcp_servers") / "tool_server.py")


def write_mcp_json(text: str) -> Path:
    path = paths.config_dir() / "mcp.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def make_app(qtbot, isolated_moebar_home: Path, fake_engine_command: list[str], tmp_path: Path):
    apps: list[MoeBarApp] = []

    def make(mcp_json: str | None = None, model: str = "my-model") -> MoeBarApp:
        if mcp_json is not None:
            write_mcp_json(mcp_json)
        SettingsStore().set("model_dir", str(tmp_path / model))
        app = MoeBarApp(QtWidgets.QApplication.instance(), fake_engine_command, use_tray=True)
        qtbot.addWidget(app.window)
        apps.append(app)
        app.start()
        qtbot.waitUntil(lambda: app.bridge.state == READY, timeout=10_000)
        return app

    yield make
    for app in apps:
        app.shutdown()


def tools_config() -> str:
    return json.dumps({"mcpServers": {"tools": {"command": sys.executable, "args": [TOOL_SERVER],
                                                "disabledTools": ["long_text"], "myNote": "kept"}},
                       "unknownTopLevel": [1, 2]}, indent=2)


def wait_ready(qtbot, app: MoeBarApp, name: str = "tools") -> None:
    qtbot.waitUntil(lambda: (s := app.mcp.states().get(name)) is not None and s.status == "ready", timeout=30_000)


def cards(app: MoeBarApp) -> list[ToolCallCard]:
    return app.window.chat_view.findChildren(ToolCallCard)


def test_mcp_tool_round_trip_with_approval_always_and_stop(qtbot, make_app) -> None:
    app = make_app(tools_config())
    wait_ready(qtbot, app)
    requests: list[ChatRequest] = []
    real_chat = app.bridge.chat
    app.bridge.chat = lambda request: (requests.append(request), real_chat(request))[1]  # type: ignore[method-assign]
    controller = app.controller
    controller.send('tool:mcp__tools__add {"a": 2, "b": 3}')
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    offered = [t["function"]["name"] for t in requests[0].tools]
    assert "mcp__tools__add" in offered and "mcp__tools__long_text" not in offered  # switched off in mcp.json
    assert "read_file" not in offered  # nothing dropped: the file tools are not offered
    card = cards(app)[-1]
    assert card.state() == "awaiting" and '"a": 2' in card.arguments_view.toPlainText()
    title = card.findChild(QtWidgets.QLabel, "toolTitle").text()
    assert title == "Tool call: <b>add</b> from the MCP server <b>tools</b>"
    assert card.always_button.text() == "Always allow add from tools"
    card.always_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=20_000)
    assert card.state() == "done" and card.result_text() == "5"
    assert "The tool said: 5" in controller.entries[-1].content
    assert "mcp__tools__add" in app.settings.get("always_approved_tools")
    # "Always" holds for this server's tool only: another tool of the server still asks.
    controller.new_conversation()  # (the scripted engine numbers its calls per chat)
    controller.send('tool:mcp__tools__echo_env {"name": "HOME"}')
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    cards(app)[-1].deny_button.click()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    controller.new_conversation()
    controller.send('tool:mcp__tools__add {"a": 1, "b": 1}')  # approved always: runs without asking
    qtbot.waitUntil(lambda: not controller.is_busy() and "The tool said: 2" in controller.entries[-1].content,
                    timeout=20_000)
    # Stop ends a running MCP call; the server goes on.
    controller.new_conversation()
    controller.send('tool:mcp__tools__sleep {"seconds": 60}')
    qtbot.waitUntil(lambda: bool(controller.awaiting_calls()), timeout=10_000)
    cards(app)[-1].approve_button.click()
    qtbot.waitUntil(lambda: cards(app)[-1].state() == "running", timeout=10_000)
    controller.stop()
    qtbot.waitUntil(lambda: not controller.is_busy(), timeout=10_000)
    assert cards(app)[-1].state() == "denied"
    assert app.mcp.tools.run("mcp__tools__add", {"a": 4, "b": 4}) == "8"


def test_settings_section_restart_disable_and_tool_switches(qtbot, make_app) -> None:
    app = make_app(tools_config())
    wait_ready(qtbot, app)
    dialog = app.build_settings_dialog()
    panel = dialog.findChild(McpServersPanel)
    row = panel.rows["tools"]
    assert row.state_label.text() == "ready with 8 tools"
    checks = {row.tools.item(i).text(): row.tools.item(i).checkState() for i in range(row.tools.count())}
    assert checks["long_text"].name == "Unchecked" and checks["add"].name == "Checked"
    row.disable_button.click()
    qtbot.waitUntil(lambda: app.mcp.states()["tools"].status == "disabled", timeout=20_000)
    qtbot.waitUntil(lambda: row.state_label.text() == "disabled", timeout=5000)
    assert app.mcp.tools.offered() == {}
    saved = json.loads(app.mcp.config.path.read_text())
    assert saved["mcpServers"]["tools"]["disabled"] is True
    assert saved["mcpServers"]["tools"]["myNote"] == "kept" and saved["unknownTopLevel"] == [1, 2]
    row.restart_button.click()  # enables it again
    wait_ready(qtbot, app)
    qtbot.waitUntil(lambda: row.state_label.text() == "ready with 8 tools", timeout=5000)
    item = next(row.tools.item(i) for i in range(row.tools.count()) if row.tools.item(i).text() == "add")
    item.setCheckState(item.checkState().Unchecked)
    assert "mcp__tools__add" not in app.mcp.tools.offered()
    assert "add" in json.loads(app.mcp.config.path.read_text())["mcpServers"]["tools"]["disabledTools"]
    dialog.reject()


def test_malformed_mcp_json_names_the_line_and_the_app_still_works(qtbot, make_app) -> None:
    app = make_app('{\n  "mcpServers": {\n    "x": {"command": "a",}\n  }\n}\n')
    assert "MCP servers:" in app.window.notice_bar.text() and "line 3 column" in app.window.notice_bar.text()
    dialog = app.build_settings_dialog()
    panel = dialog.findChild(McpServersPanel)
    assert panel.problems.text().startswith(str(app.mcp.config.path)) and not panel.rows
    dialog.reject()
    assert app.controller.send("hello")  # chat works without any MCP server
    qtbot.waitUntil(lambda: not app.controller.is_busy(), timeout=10_000)
    assert "Echo: hello" in app.controller.entries[-1].content


def test_import_from_claude_desktop_file(qtbot, make_app, tmp_path: Path) -> None:
    app = make_app()
    claude = tmp_path / "claude_desktop_config.json"
    claude.write_text(json.dumps({"mcpServers": {"tools": {"command": sys.executable, "args": [TOOL_SERVER]}}}))
    dialog = app.build_settings_dialog()
    panel = dialog.findChild(McpServersPanel)
    added, problems = panel.import_from(claude)
    assert added == ["tools"] and problems == [] and "tools" in panel.rows
    wait_ready(qtbot, app)
    assert json.loads(app.mcp.config.path.read_text())["mcpServers"]["tools"]["args"] == [TOOL_SERVER]
    dialog.reject()


def test_tray_model_picker_lists_recent_and_demo_and_loads_the_choice(qtbot, make_app, tmp_path: Path) -> None:
    (tmp_path / "my-model").mkdir()
    (tmp_path / "other-model").mkdir()
    app = make_app()
    assert app.settings.get("recent_models")[0] == str(tmp_path / "my-model")
    app.picker.choose(str(tmp_path / "other-model"))
    qtbot.waitUntil(lambda: app.bridge.model is not None and app.bridge.model.name == "other-model", timeout=10_000)
    menu = app.tray.menu.findChild(QtWidgets.QMenu, "modelMenu")
    menu.rebuild()
    entries = {a.text(): a.isChecked() for a in menu.actions()}
    assert entries == {"Demo model (random weights)": False, "other-model": True, "my-model": False}
    next(a for a in menu.actions() if a.text() == "my-model").trigger()
    qtbot.waitUntil(lambda: app.bridge.model is not None and app.bridge.model.name == "my-model", timeout=10_000)
    menu.rebuild()
    assert [a.text() for a in menu.actions() if a.isChecked()] == ["my-model"]
    assert app.settings.get("recent_models")[:2] == (str(tmp_path / "my-model"), str(tmp_path / "other-model"))


@pytest.fixture
def memory_keyring():
    import keyring
    import keyring.backend
    import keyring.errors

    class MemoryKeyring(keyring.backend.KeyringBackend):
        priority = 1  # type: ignore[assignment]
        secrets: dict[tuple[str, str], str] = {}

        def get_password(self, service: str, username: str) -> str | None:
            return self.secrets.get((service, username))

        def set_password(self, service: str, username: str, password: str) -> None:
            self.secrets[(service, username)] = password

        def delete_password(self, service: str, username: str) -> None:
            if self.secrets.pop((service, username), None) is None:
                raise keyring.errors.PasswordDeleteError("not found")

    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    backend.secrets = {}
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


def test_local_server_switch_and_tray_line(qtbot, make_app, memory_keyring) -> None:
    app = make_app()
    line = next(a for a in app.tray.menu.actions() if a.objectName() == "localServerAction")
    assert line.text() == "Local server: off"
    asked: list[tuple[object, ...]] = []
    real_serve = app.bridge.serve
    app.bridge.serve = lambda *args: (asked.append(args), real_serve(*args))[1]  # type: ignore[method-assign]
    dialog = app.build_settings_dialog()
    panel = dialog.findChild(LocalServerPanel)
    assert not panel.warning.isVisible() and panel.host_value() == "127.0.0.1"
    panel.host.setCurrentIndex(panel.host.findData("0.0.0.0"))
    assert not panel.warning.isHidden()  # another host only with a warning
    panel.host.setCurrentIndex(panel.host.findData("127.0.0.1"))
    panel.enabled.setChecked(True)
    panel.port.setValue(8123)
    panel.generate.click()
    key = panel.api_key.text()
    dialog.accept()
    qtbot.waitUntil(lambda: line.text() == "Local server: on at 127.0.0.1:8123 (no requests running)", timeout=10_000)
    assert app.settings.get("local_server_enabled") and app.settings.get("local_server_port") == 8123
    assert len(key) >= 24 and memory_keyring.secrets[("MoeBar", "local_server_api_key")] == key
    assert key not in app.settings.path.read_text()  # the key is kept in the keychain only
    assert asked[-1] == (True, "127.0.0.1", 8123, key)  # ... and sent to the engine
    app.settings.set("local_server_enabled", False)
    qtbot.waitUntil(lambda: line.text() == "Local server: off", timeout=10_000)
