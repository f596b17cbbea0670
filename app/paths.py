"""Where MoeBar keeps its files: platformdirs locations for the app name "MoeBar".

| what                         | macOS                                   | Linux                          |
|------------------------------|-----------------------------------------|--------------------------------|
| data (chat history)          | ~/Library/Application Support/MoeBar    | ~/.local/share/MoeBar          |
| config (settings.json)       | ~/Library/Application Support/MoeBar    | ~/.config/MoeBar               |
| cache (demo model, downloads)| ~/Library/Caches/MoeBar                 | ~/.cache/MoeBar                |
| logs                         | ~/Library/Logs/MoeBar                   | ~/.local/state/MoeBar/log      |

Linux honours XDG_DATA_HOME, XDG_CONFIG_HOME, XDG_CACHE_HOME and XDG_STATE_HOME. Setting
MOEBAR_HOME puts all four under that one folder instead (data/, config/, cache/, logs/), for a
portable install or for tests. To remove everything MoeBar stored, quit it and delete these
folders; the Hugging Face token is kept in the system keychain under the service "MoeBar".
`moebar_locations()` lists the folders in use on this machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

APP_NAME = "MoeBar"
HOME_OVERRIDE_ENV = "MOEBAR_HOME"


def _override_root() -> Path | None:
    value = os.environ.get(HOME_OVERRIDE_ENV, "").strip()
    return Path(value).expanduser() if value else None


def data_dir() -> Path:
    """Folder for user data (the chat history database)."""
    root = _override_root()
    return root / "data" if root else platformdirs.user_data_path(APP_NAME, appauthor=False)


def config_dir() -> Path:
    """Folder for settings.json."""
    root = _override_root()
    return root / "config" if root else platformdirs.user_config_path(APP_NAME, appauthor=False)


def cache_dir() -> Path:
    """Folder for re-creatable files: the demo model, partial downloads."""
    root = _override_root()
    return root / "cache" if root else platformdirs.user_cache_path(APP_NAME, appauthor=False)


def log_dir() -> Path:
    """Folder for the app's and the engine's log files."""
    root = _override_root()
    return root / "logs" if root else platformdirs.user_log_path(APP_NAME, appauthor=False)


def history_db_path() -> Path:
    """Default path of the chat history SQLite database."""
    return data_dir() / "history.sqlite3"


def settings_path() -> Path:
    """Default path of the settings JSON file."""
    return config_dir() / "settings.json"


def demo_model_dir() -> Path:
    """Folder where the built-in demo model is generated on first run."""
    return cache_dir() / "demo-model"


def moebar_locations() -> dict[str, Path]:
    """All folders MoeBar writes to on this machine, by purpose (for an About box or the README)."""
    return {"data": data_dir(), "config": config_dir(), "cache": cache_dir(), "logs": log_dir()}


def ensure_dir(path: Path) -> Path:
    """Create `path` (and parents) with owner-only permissions if missing; return it."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path
