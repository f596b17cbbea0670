"""mcp.json parsing, saving and importing; the login-shell PATH; tool names; result text. No servers run here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mcp import types

from app.mcp.config import (
    McpConfigError,
    import_servers,
    known_import_sources,
    load_config,
    save_config,
    set_server_flags,
)
from app.mcp.login_path import login_shell_path
from app.mcp.results import result_text
from app.mcp.tools import public_name
from app.tools import BUILTIN_TOOLS


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_reads_stdio_and_remote_servers(tmp_path: Path) -> None:
    path = write(tmp_path / "mcp.json", json.dumps({"mcpServers": {
        "files": {"command": "npx", "args": ["-y", "server-fs", "~/notes"], "env": {"A": "1"}, "timeout": 5},
        "search": {"url": "https://example.com/mcp", "headers": {"Authorization": "Bearer k"}},
        "off": {"command": "uvx", "disabled": True, "disabledTools": ["write"]},
    }}))
    config = load_config(path)
    assert config.problems == []
    files, search, off = config.servers["files"], config.servers["search"], config.servers["off"]
    assert files.command == "npx" and files.args == ("-y", "server-fs", "~/notes") and files.env == {"A": "1"}
    assert files.timeout_s == 5.0 and not files.is_remote
    assert search.is_remote and search.headers == {"Authorization": "Bearer k"} and search.timeout_s == 60.0
    assert off.disabled and off.disabled_tools == {"write"}


def test_missing_file_is_an_empty_configuration(tmp_path: Path) -> None:
    config = load_config(tmp_path / "none.json")
    assert config.servers == {} and config.problems == [] and config.readable


def test_malformed_json_names_the_line_and_is_never_overwritten(tmp_path: Path) -> None:
    path = write(tmp_path / "mcp.json", '{\n  "mcpServers": {\n    "a": {"command": "x",}\n  }\n}\n')
    config = load_config(path)
    assert not config.readable and config.servers == {}
    assert len(config.problems) == 1 and "line 3" in config.problems[0] and str(path) in config.problems[0]
    with pytest.raises(McpConfigError, match="will not overwrite"):
        save_config(config)
    assert path.read_text().count('"x",}') == 1


@pytest.mark.parametrize("entry, problem", [
    ({"args": []}, "needs 'command'"),
    ({"command": ""}, "'command' must be non-empty text"),
    ({"command": "x", "args": "a b"}, "'args' must be a list of text"),
    ({"command": "x", "env": {"A": 1}}, "'env.A' must be text"),
    ({"command": "x", "timeout": 0}, "'timeout' must be a number of seconds"),
    ({"command": "x", "timeout": "10"}, "'timeout' must be a number of seconds"),
    ({"url": "ftp://x"}, "'url' must start with http"),
    ({"command": "x", "url": "http://x"}, "not both"),
    ({"command": "x", "disabled": "yes"}, "'disabled' must be true or false"),
    ([1, 2], "must be an object"),
])
def test_a_bad_entry_names_server_line_and_field_and_the_others_still_load(
        tmp_path: Path, entry: object, problem: str) -> None:
    text = json.dumps({"mcpServers": {"good": {"command": "ok"}, "broken": entry}}, indent=2)
    config = load_config(write(tmp_path / "mcp.json", text))
    assert list(config.servers) == ["good"]
    assert len(config.problems) == 1
    line = next(i for i, row in enumerate(text.splitlines(), 1) if '"broken"' in row)
    assert f"line {line}: server 'broken': " in config.problems[0] and problem in config.problems[0]


def test_top_level_problems(tmp_path: Path) -> None:
    assert "top level must be an object" in load_config(write(tmp_path / "a.json", "[]")).problems[0]
    config = load_config(write(tmp_path / "b.json", '{\n"mcpServers": []}'))
    assert "line 2" in config.problems[0] and '"mcpServers" must be an object' in config.problems[0]
    (tmp_path / "c.json").write_bytes(b'{"mcpServers": {}}\n\xff')
    assert "not UTF-8" in load_config(tmp_path / "c.json").problems[0]


def test_saving_flags_keeps_keys_the_app_does_not_know(tmp_path: Path) -> None:
    original = {"mcpServers": {"a": {"command": "x", "customKey": {"nested": [1, 2]}, "autoApprove": ["t"]}},
                "globalShortcut": "Ctrl+Space", "otherApp": {"keep": True}}
    path = write(tmp_path / "mcp.json", json.dumps(original))
    config = load_config(path)
    set_server_flags(config, "a", disabled=True, disabled_tools=frozenset({"write", "delete"}))
    save_config(config)
    saved = json.loads(path.read_text())
    assert saved["globalShortcut"] == "Ctrl+Space" and saved["otherApp"] == {"keep": True}
    assert saved["mcpServers"]["a"]["customKey"] == {"nested": [1, 2]} and saved["mcpServers"]["a"]["autoApprove"] == ["t"]
    assert saved["mcpServers"]["a"]["disabled"] is True and saved["mcpServers"]["a"]["disabledTools"] == ["delete", "write"]
    again = load_config(path)
    assert again.servers["a"].disabled and again.servers["a"].disabled_tools == {"write", "delete"}
    set_server_flags(again, "a", disabled=False, disabled_tools=frozenset())
    save_config(again)
    assert json.loads(path.read_text())["mcpServers"]["a"] == original["mcpServers"]["a"]


def test_import_from_claude_desktop_adds_new_names_only(tmp_path: Path) -> None:
    ours = load_config(write(tmp_path / "mcp.json", json.dumps({"mcpServers": {"files": {"command": "mine"}}})))
    claude = write(tmp_path / "claude_desktop_config.json", json.dumps({
        "mcpServers": {"files": {"command": "theirs"}, "git": {"command": "uvx", "args": ["mcp-server-git"]},
                       "bad": {"command": 1}},
        "preferences": {"x": 1}}))
    added, problems = import_servers(ours, claude)
    assert added == ["git"]
    assert any("'files'" in p and "already exists" in p for p in problems)
    assert any("server 'bad'" in p for p in problems)
    save_config(ours)
    saved = json.loads((tmp_path / "mcp.json").read_text())
    assert saved["mcpServers"]["files"] == {"command": "mine"} and saved["mcpServers"]["git"]["args"] == ["mcp-server-git"]
    assert "preferences" not in saved


def test_import_sources_per_platform(tmp_path: Path) -> None:
    mac = known_import_sources("darwin", tmp_path)
    assert mac["Claude Desktop"] == tmp_path / "Library/Application Support/Claude/claude_desktop_config.json"
    assert mac["LM Studio"] == tmp_path / ".lmstudio/mcp.json"
    assert known_import_sources("linux", tmp_path)["Claude Desktop"].name == "claude_desktop_config.json"


def test_login_shell_path_on_macos_from_a_fake_shell() -> None:
    calls = []

    def fake_zsh(command, timeout):
        calls.append(command)
        return "Last login: today\n__MOEBAR_PATH__/opt/homebrew/bin:/usr/bin:/Users/me/.nvm/bin__MOEBAR_PATH__"

    path = login_shell_path("darwin", {"PATH": "/usr/bin:/bin", "SHELL": "/bin/zsh"}, fake_zsh)
    assert path == "/opt/homebrew/bin:/usr/bin:/Users/me/.nvm/bin:/bin"
    assert calls[0][:3] == ["/bin/zsh", "-l", "-c"]


def test_login_shell_path_falls_back_and_is_not_used_on_linux() -> None:
    def broken(command, timeout):
        raise OSError("no such shell")

    def silent(command, timeout):
        return "motd only"

    env = {"PATH": "/usr/bin:/bin", "SHELL": "/bin/fish"}
    assert login_shell_path("darwin", env, broken) == "/usr/bin:/bin"
    assert login_shell_path("darwin", env, silent) == "/usr/bin:/bin"
    assert login_shell_path("linux", env, broken) == "/usr/bin:/bin"  # the runner is never called


def test_public_names_are_distinct_from_builtins_and_each_other() -> None:
    builtin = {tool.name for tool in BUILTIN_TOOLS}
    names = {public_name("files", "read_file"), public_name("git", "read_file"), public_name("a b", "x"),
             public_name("a_b", "x"), public_name("s" * 40, "t" * 40), public_name("s" * 40, "t" * 41)}
    assert len(names) == 6 and not names & builtin
    assert public_name("files", "read_file") == "mcp__files__read_file"
    assert all(len(n) <= 64 and n.replace("_", "").replace("-", "").isalnum() for n in names)


def test_result_text_describes_non_text_and_cuts_long_results() -> None:
    image = types.ImageContent(type="image", data="AAAA" * 300, mime_type="image/png")
    text = result_text([types.TextContent(type="text", text="hello"), image])
    assert text.startswith("hello\n[image (image/png, 900 B)") and "AAAA" not in text
    assert result_text([], {"answer": 42}) == '{\n "answer": 42\n}'
    assert result_text([]) == "(the tool returned nothing)"
    long = result_text([types.TextContent(type="text", text="y" * 50_000)], limit=1000)
    assert long.startswith("y" * 1000) and "y" * 1001 not in long
    assert "50,000 characters" in long and "first 1,000" in long
