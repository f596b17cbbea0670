"""Fixtures for the app tests: a bridge on the scripted engine, isolated settings and paths."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.bridge import EngineBridge

FAKE_ENGINE = Path(__file__).with_name("fake_engine.py")
FAKE_ENGINE_COMMAND = [sys.executable, str(FAKE_ENGINE)]


@pytest.fixture
def fake_engine_command() -> list[str]:
    """The command line that starts the scripted fake engine."""
    return list(FAKE_ENGINE_COMMAND)


@pytest.fixture
def isolated_moebar_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Keep settings, history and logs of a test in its own folder."""
    home = tmp_path / "moebar-home"
    monkeypatch.setenv("MOEBAR_HOME", str(home))
    return home


@pytest.fixture
def fake_bridge(qtbot: object, tmp_path: Path) -> Iterator[EngineBridge]:
    """An EngineBridge running the scripted fake engine (no model loaded yet)."""
    bridge = EngineBridge(FAKE_ENGINE_COMMAND, log_path=tmp_path / "engine.log")
    yield bridge
    bridge.shutdown()
