"""McpHub and McpTools against real MCP servers (the SDK's MCPServer) over stdio and streamable HTTP, and bad ones.

All servers of the module start once, together (each costs 1-3 s to start).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.mcp.check import main as check_main
from app.mcp.config import McpConfig, ServerConfig, load_config
from app.mcp.hub import McpHub, ServerState
from app.mcp.tools import STOPPED_RESULT, McpTools, public_name
from app.tools import ToolError

SERVERS = Path(__file__).with_name("mcp_servers")
TOOL_SERVER = str(SERVERS / "tool_server.py")
BAD_SERVER = str(SERVERS / "bad_server.py")
LOGIN_PATH_MARK = "/moebar-test-login-path"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the HTTP MCP server exited with {process.returncode}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("the HTTP MCP server did not open its port")


def _configs(http_port: int) -> dict[str, ServerConfig]:
    py = sys.executable
    return {c.name: c for c in (
        ServerConfig("tools", command=py, args=(TOOL_SERVER,), env={"GREETING": "hello from mcp.json"},
                     disabled_tools=frozenset({"long_text"})),
        ServerConfig("quick", command=py, args=(TOOL_SERVER,), timeout_s=8),
        ServerConfig("remote", url=f"http://127.0.0.1:{http_port}/mcp", headers={"X-Test": "1"}),
        ServerConfig("missing", command="moebar-no-such-mcp-server"),
        ServerConfig("exits", command=py, args=(BAD_SERVER, "exit")),
        ServerConfig("garbage", command=py, args=(BAD_SERVER, "garbage")),
        ServerConfig("silent", command=py, args=(BAD_SERVER, "silent"), timeout_s=2),
        ServerConfig("off", command=py, args=(TOOL_SERVER,), disabled=True),
        ServerConfig("crashy", command=py, args=(TOOL_SERVER,)),
    )}


def _settle(hub: McpHub) -> None:
    deadline = time.monotonic() + 60
    while any(s.status == "starting" for s in hub.states().values()) and time.monotonic() < deadline:
        time.sleep(0.05)


class Hub:
    """The module's hub, its configuration and the states it reported (from the hub's thread)."""

    def __init__(self, hub: McpHub, config: McpConfig, reported: list[ServerState]) -> None:
        self.hub = hub
        self.config = config
        self.reported = reported
        self.tools = McpTools(hub, lambda: config, max_result_chars=2000)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hub]:
    port = _free_port()
    http = subprocess.Popen([sys.executable, TOOL_SERVER, "http", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reported: list[ServerState] = []
    hub = McpHub(tmp_path_factory.mktemp("mcp-logs"),
                 path_for_servers=lambda: os.environ["PATH"] + os.pathsep + LOGIN_PATH_MARK,
                 on_state=reported.append, ping_interval_s=0.5)
    try:
        configs = _configs(port)
        config = McpConfig(path=Path("mcp.json"), servers=configs)
        for name, server in configs.items():
            if name not in ("remote", "quick"):
                hub.start_server(server)
        _wait_for_port(port, http)
        hub.start_server(configs["remote"])
        _settle(hub)
        hub.start_server(configs["quick"])  # alone, so that its short timeout is not spent waiting for a busy CPU
        _settle(hub)
        yield Hub(hub, config, reported)
    finally:
        hub.shutdown()
        http.terminate()
        http.wait(10)


def test_good_servers_are_ready_with_their_tools(running: Hub) -> None:
    states = running.hub.states()
    for name in ("tools", "quick", "remote"):
        assert states[name].status == "ready", states[name]
        assert {t.name for t in states[name].tools} == {"add", "echo_env", "long_text", "picture", "sleep", "pid", "http_header", "fail"}
    assert states["tools"].summary() == "ready with 8 tools"
    assert states["off"].status == "disabled"
    starting = [s.name for s in running.reported if s.status == "starting"]
    assert "tools" in starting and "off" not in starting


@pytest.mark.parametrize("name, reason", [
    ("missing", "the command 'moebar-no-such-mcp-server' was not found on the PATH"),
    ("exits", "bad_server: missing API key, giving up"),  # quoted from its stderr
    ("garbage", "not MCP JSON-RPC on stdout: 'Hello! I am not JSON-RPC at all'"),
    ("silent", "did not answer within 2 s"),
])
def test_bad_servers_fail_alone_with_a_reason(running: Hub, name: str, reason: str) -> None:
    state = running.hub.states()[name]
    assert state.status == "failed" and reason in state.reason, state.reason
    assert state.summary().startswith("failed: ")
    log = running.hub.log_path(name).read_text()
    assert "moebar: starting" in log and "moebar: failed" in log
    assert running.hub.states()["tools"].status == "ready"  # the others carry on


def test_server_stderr_goes_to_its_own_log(running: Hub) -> None:
    assert "tool_server: up" in running.hub.log_path("tools").read_text()
    assert "giving up" in running.hub.log_path("exits").read_text()
    assert "giving up" not in running.hub.log_path("tools").read_text()


def test_servers_get_the_login_path_and_their_env(running: Hub) -> None:
    path = running.tools.run(public_name("tools", "echo_env"), {"name": "PATH"})
    assert path.endswith(LOGIN_PATH_MARK)
    assert running.tools.run(public_name("tools", "echo_env"), '{"name": "GREETING"}') == "hello from mcp.json"


def test_only_enabled_tools_of_ready_servers_are_offered(running: Hub) -> None:
    offered = running.tools.offered()
    assert public_name("tools", "add") in offered and public_name("remote", "add") in offered
    assert public_name("tools", "long_text") not in offered  # switched off in the configuration
    assert public_name("quick", "long_text") in offered
    assert not any(name.startswith("mcp__off__") or name.startswith("mcp__silent__") for name in offered)
    schema = next(s for s in running.tools.schemas() if s["function"]["name"] == public_name("tools", "add"))
    assert schema["function"]["parameters"]["required"] == ["a", "b"]
    assert "MCP server 'tools'" in schema["function"]["description"]
    with pytest.raises(ToolError, match="not available now"):
        running.tools.run(public_name("tools", "long_text"), {"characters": 5})


def test_calls_over_stdio_and_http(running: Hub) -> None:
    assert running.tools.run(public_name("tools", "add"), {"a": 2, "b": 3}) == "5"
    assert running.tools.run(public_name("remote", "add"), {"a": 40, "b": 2}) == "42"
    assert running.tools.run(public_name("remote", "http_header"), {"name": "X-Test"}) == "1"  # mcp.json's headers
    assert running.tools.run(public_name("tools", "http_header"), {"name": "X-Test"}) == "(none)"


def test_non_text_results_are_described_and_long_ones_cut(running: Hub) -> None:
    picture = running.tools.run(public_name("tools", "picture"), {})
    assert picture.startswith("[image (image/png, 108 B)") and "iVBOR" not in picture
    long = running.tools.run(public_name("quick", "long_text"), {"characters": 9000})
    assert long.startswith("0123456789") and "[Result cut: the tool returned 9,000 characters" in long


def test_tool_errors_name_the_server(running: Hub) -> None:
    with pytest.raises(ToolError, match="'tools' reported an error from fail: .*disk on fire"):
        running.tools.run(public_name("tools", "fail"), {"message": "disk on fire"})
    with pytest.raises(ToolError, match="not valid JSON"):
        running.tools.run(public_name("tools", "add"), "{a: 1")


def test_a_call_past_the_server_timeout_fails_and_the_server_goes_on(running: Hub) -> None:
    with pytest.raises(ToolError, match="'quick' did not answer the call of sleep within 8 s"):
        running.tools.run(public_name("quick", "sleep"), {"seconds": 30})
    assert running.tools.run(public_name("quick", "add"), {"a": 1, "b": 1}) == "2"


def test_a_call_can_be_stopped(running: Hub) -> None:
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    started = time.monotonic()
    with pytest.raises(ToolError, match=STOPPED_RESULT):
        running.tools.run(public_name("tools", "sleep"), {"seconds": 30}, stop.is_set)
    assert time.monotonic() - started < 20  # far less than the call would take; not a speed check
    assert running.tools.run(public_name("tools", "add"), {"a": 1, "b": 2}) == "3"


def test_a_server_that_dies_while_ready_is_reported(running: Hub) -> None:
    pid = int(running.tools.run(public_name("crashy", "pid"), {}))
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while running.hub.states()["crashy"].status == "ready" and time.monotonic() < deadline:
        time.sleep(0.05)
    state = running.hub.states()["crashy"]
    assert state.status == "failed" and state.reason, state
    assert public_name("crashy", "add") not in running.tools.offered()
    assert running.tools.run(public_name("tools", "add"), {"a": 1, "b": 2}) == "3"  # the others carry on


def test_restart_and_stop(running: Hub) -> None:
    running.hub.stop_server("quick")
    assert running.hub.states()["quick"].status == "stopped"
    with pytest.raises(ToolError, match="not available now"):
        running.tools.run(public_name("quick", "add"), {"a": 1, "b": 1})
    with pytest.raises(Exception, match="'quick' is not running \\(stopped\\)"):
        running.hub.call_tool("quick", "add", {"a": 1, "b": 1})
    running.hub.start_server(running.config.servers["quick"])
    _settle(running.hub)
    assert running.hub.states()["quick"].status == "ready"
    assert running.tools.run(public_name("quick", "add"), {"a": 1, "b": 1}) == "2"


def test_check_command_reports_each_server(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {
        "tools": {"command": sys.executable, "args": [TOOL_SERVER]},
        "exits": {"command": sys.executable, "args": [BAD_SERVER, "exit"]},
        "broken": {"command": 7},
    }}, indent=2))
    assert load_config(path).problems  # 'broken' is reported, the others start
    code = check_main(["check", "--config", str(path), "--json"])
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    by_name = {s["name"]: s for s in report["servers"]}
    assert by_name["tools"]["ok"] and {"name": "add", "description": "Add two whole numbers.", "enabled": True} \
        in by_name["tools"]["tools"]
    assert not by_name["exits"]["ok"] and "giving up" in by_name["exits"]["reason"]
    assert "MCP server 'exits' failed" in err and "server 'broken'" in err and "'tools'" not in err


def test_check_command_text_and_success(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": {"tools": {"command": sys.executable, "args": [TOOL_SERVER]}}}))
    assert check_main(["check", "--config", str(path)]) == 0
    out = capsys.readouterr().out
    assert "tools: ok, 8 tools" in out and "  add: Add two whole numbers." in out
    assert check_main(["check", "--config", str(tmp_path / "none.json")]) == 2
