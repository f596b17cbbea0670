"""app.paths: platformdirs locations for "MoeBar" and the MOEBAR_HOME override."""

from __future__ import annotations

import sys
from pathlib import Path

import platformdirs
import pytest

from app import paths


def test_default_locations_come_from_platformdirs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(paths.HOME_OVERRIDE_ENV, raising=False)
    assert paths.data_dir() == platformdirs.user_data_path("MoeBar", appauthor=False)
    assert paths.config_dir() == platformdirs.user_config_path("MoeBar", appauthor=False)
    assert paths.cache_dir() == platformdirs.user_cache_path("MoeBar", appauthor=False)
    assert paths.log_dir() == platformdirs.user_log_path("MoeBar", appauthor=False)
    assert paths.history_db_path().parent == paths.data_dir()
    assert paths.settings_path() == paths.config_dir() / "settings.json"
    assert all("MoeBar" in str(p) for p in paths.moebar_locations().values())


@pytest.mark.skipif(sys.platform != "linux", reason="XDG variables apply on Linux")
def test_xdg_variables_move_the_folders_on_linux(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(paths.HOME_OVERRIDE_ENV, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg-data"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    assert paths.history_db_path() == tmp_path / "xdg-data" / "MoeBar" / "history.sqlite3"
    assert paths.settings_path() == tmp_path / "xdg-config" / "MoeBar" / "settings.json"


def test_moebar_home_puts_everything_under_one_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(paths.HOME_OVERRIDE_ENV, str(tmp_path / "portable"))
    assert paths.moebar_locations() == {
        "data": tmp_path / "portable" / "data", "config": tmp_path / "portable" / "config",
        "cache": tmp_path / "portable" / "cache", "logs": tmp_path / "portable" / "logs"}
    assert paths.demo_model_dir() == tmp_path / "portable" / "cache" / "demo-model"


def test_ensure_dir_creates_owner_only_folder(tmp_path: Path) -> None:
    target = paths.ensure_dir(tmp_path / "a" / "b")
    assert target.is_dir()
    assert target.stat().st_mode & 0o077 == 0
