"""app/frozen.py: how a source run and a frozen bundle start the engine and the other helpers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from app import frozen
from engine.serving.protocol import ErrorEvent, HelloEvent, UnloadedEvent, decode_event

ROOT = Path(__file__).resolve().parents[2]
ENTRY = ROOT / "packaging" / "moebar_entry.py"


def test_source_run_starts_the_engine_module_with_this_python() -> None:
    assert frozen.engine_command(frozen=False, executable="/venv/bin/python") == [
        "/venv/bin/python", "-m", "engine.serving.stdio_server"]


def test_frozen_run_starts_its_own_binary_as_the_engine() -> None:
    assert frozen.engine_command(frozen=True, executable="/Applications/MoeBar.app/Contents/MacOS/MoeBar") == [
        "/Applications/MoeBar.app/Contents/MacOS/MoeBar", "--engine-stdio"]


def test_engine_command_follows_sys_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(sys, "frozen", raising=False)
    assert frozen.engine_command() == [sys.executable, "-m", "engine.serving.stdio_server"]
    monkeypatch.setattr(sys, "frozen", True, raising=False)
    assert frozen.is_frozen()
    assert frozen.engine_command() == [sys.executable, "--engine-stdio"]


def test_bridge_default_is_the_resolved_engine_command() -> None:
    from app.bridge import DEFAULT_ENGINE_COMMAND

    assert list(DEFAULT_ENGINE_COMMAND) == frozen.engine_command()


@pytest.mark.parametrize(("argv", "kind"), [
    (["MoeBar"], None),
    (["MoeBar", "--background"], None),
    (["MoeBar", "--no-tray"], None),
    (["MoeBar", "--engine-stdio"], "engine-stdio"),
    (["MoeBar", "--engine-stdio", "--log-level", "DEBUG"], "engine-stdio"),
    (["MoeBar", "--self-check"], "self-check"),
    (["MoeBar", "-m", "engine.cli", "plan", "/m"], "module"),
    (["MoeBar", "-m"], None),  # -m needs its module, as with python
    (["MoeBar", "-c", "print(1)"], "code"),
    (["MoeBar", "-c"], None),
    (["MoeBar", "--background", "--engine-stdio"], None),  # only the first argument selects a helper
])
def test_helper_kind(argv: list[str], kind: str | None) -> None:
    assert frozen.helper_kind(argv) == kind


def test_app_command_lines_run_no_helper() -> None:
    assert frozen.run_helper(["MoeBar", "--background"]) is None


def test_code_helper_runs_like_python_c(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    out = tmp_path / "out.json"
    code = f"import json, sys; open({str(out)!r}, 'w').write(json.dumps([__name__, sys.argv]))"
    assert frozen.run_helper(["MoeBar", "-c", code, "a", "b"]) == 0
    assert json.loads(out.read_text()) == ["__main__", ["-c", "a", "b"]]


def test_module_helper_runs_like_python_m(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out.json"
    (tmp_path / "moebar_probe_mod.py").write_text(
        "import json, sys\n"
        "if __name__ == '__main__':\n"
        f"    open({str(out)!r}, 'w').write(json.dumps(sys.argv[1:]))\n")
    assert frozen.run_helper(["MoeBar", "-m", "moebar_probe_mod", "x", "--y"]) == 0
    assert json.loads(out.read_text()) == ["x", "--y"]


def test_helper_exit_status_propagates(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    with pytest.raises(SystemExit) as exited:
        frozen.run_helper(["MoeBar", "-c", "import sys; sys.exit(3)"])
    assert exited.value.code == 3


def test_self_check_computes_with_mlx_and_finds_data() -> None:
    facts = frozen.self_check()
    assert facts["sum"] == 90.0
    assert facts["frozen"] is False
    assert facts["app_icon"] is True
    assert all(facts["tiktoken_files"].values())
    assert all(size > 0 for size in facts["chat_templates"].values())


def run_entry(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    """The bundle's entry script, run from source (what the frozen binary runs)."""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "QT_QPA_PLATFORM": "offscreen"}
    return subprocess.run([sys.executable, str(ENTRY), *args], check=False, input=stdin, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=120, env=env)


def test_entry_script_serves_the_engine_protocol() -> None:
    done = run_entry("--engine-stdio", "--idle-stats-interval", "0",
                     stdin='{"v": 1, "type": "nonsense"}\n{"v": 1, "type": "unload"}\n')
    assert done.returncode == 0, done.stderr
    events = [decode_event(line) for line in done.stdout.splitlines()]
    assert [type(event) for event in events] == [HelloEvent, ErrorEvent, UnloadedEvent]
    assert isinstance(events[1], ErrorEvent) and events[1].field == "type"


def test_entry_script_engine_does_not_load_qt() -> None:
    code = "import sys; print(sorted(m for m in sys.modules if m.startswith(('PySide6', 'app.ui'))))"
    done = run_entry("-c", code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_entry_script_runs_module_helpers() -> None:
    done = run_entry("-m", "engine.cli", "--help")
    assert done.returncode == 0, done.stderr
    assert "plan" in done.stdout
