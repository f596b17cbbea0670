"""Typed app settings stored as JSON, with validation on load, atomic saves and a change signal.

Secrets (the Hugging Face token) never go into the JSON file: use `get_secret`/`set_secret`,
which store them in the system keychain through `keyring`.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keyring
import keyring.errors

from app import paths
from app.qt import QObject, Signal
from app.several_macs import HostListError, check_hosts

log = logging.getLogger(__name__)

KEYRING_SERVICE = "MoeBar"
HF_TOKEN_SECRET = "huggingface_token"
THEMES = ("light", "dark", "system")
_MAX_SETTINGS_FILE_BYTES = 1 << 20


def _describe(kind: str, description: str, **rules: Any) -> dict[str, Any]:
    return {"kind": kind, "description": description, **rules}


@dataclass(frozen=True)
class Settings:
    """Every user setting with its default; field metadata carries a description and limits."""

    model_dir: str = field(default="", metadata=_describe(
        "str", "Folder of the model to run; empty means the built-in demo model."))
    cache_mb: int = field(default=0, metadata=_describe(
        "int", "Expert cache size in MB; 0 lets the engine choose from free memory.", min=0, max=1 << 22))
    memory_limit_mb: int = field(default=0, metadata=_describe(
        "int", "Most memory the engine may use in MB (its RSS plus MLX's buffers); 0 means no limit.",
        min=0, max=1 << 22))
    experts_per_token: int | None = field(default=None, metadata=_describe(
        "optional_int", "Experts used per token; empty keeps the model's own value.", min=1, max=256))
    cold_mode: bool = field(default=False, metadata=_describe(
        "bool", "Keep no experts resident between requests (lowest memory use, slower)."))
    record_routing_traces: bool = field(default=False, metadata=_describe(
        "bool", "Save each answer's expert routing as a trace file (for moebar-engine cache-sim); "
        "applies at the next model load."))
    theme: str = field(default="system", metadata=_describe(
        "str", "Colour theme.", choices=THEMES))
    system_prompt: str = field(default="", metadata=_describe(
        "str", "Text sent as the system message at the start of every chat.", max_length=100_000))
    temperature: float = field(default=0.7, metadata=_describe(
        "float", "Sampling temperature; 0 always picks the most likely token.", min=0.0, max=2.0))
    top_p: float = field(default=0.95, metadata=_describe(
        "float", "Nucleus sampling: keep the smallest set of tokens whose probability reaches this.",
        min=0.01, max=1.0))
    max_tokens: int = field(default=4096, metadata=_describe(
        "int", "Longest answer, in tokens.", min=1, max=1_000_000))
    thinking: bool = field(default=True, metadata=_describe(
        "bool", "Let the model reason before answering (for models that support it)."))
    always_approved_tools: frozenset[str] = field(default=frozenset(), metadata=_describe(
        "str_set", "Tools that run without asking each time."))
    window_geometry: str = field(default="", metadata=_describe(
        "base64", "Chat window position and size (base64 of QWidget.saveGeometry())."))
    hf_repo_last_used: str = field(default="", metadata=_describe(
        "str", "Hugging Face repository last downloaded from, e.g. 'Qwen/Qwen3-30B-A3B'.", max_length=200))
    quick_ask_shortcut: str = field(default="Ctrl+Shift+Space", metadata=_describe(
        "str", "Global shortcut that opens Quick Ask from any app, as Qt writes it (on macOS 'Ctrl' is "
        "Command); empty turns it off.", max_length=60))
    recent_models: tuple[str, ...] = field(default=(), metadata=_describe(
        "str_list", "Model folders loaded lately, newest first (the tray's model menu).", max_items=10))
    local_server_enabled: bool = field(default=False, metadata=_describe(
        "bool", "Serve the loaded model to other programs over the OpenAI-compatible API."))
    local_server_host: str = field(default="127.0.0.1", metadata=_describe(
        "str", "Address the local server listens on; 127.0.0.1 is this computer only.", max_length=255))
    local_server_port: int = field(default=8080, metadata=_describe(
        "int", "TCP port of the local server.", min=1, max=65535))
    several_macs_enabled: bool = field(default=False, metadata=_describe(
        "bool", "Run the model on several Macs (expert parallelism), this one as rank 0; needs two hosts."))
    several_macs_hosts: tuple[str, ...] = field(default=(), metadata=_describe(
        "host_list", "The Macs that run the model together, as host:port, this Mac first (rank 0)."))

SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Settings))
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


@dataclass(frozen=True)
class SettingInfo:
    """What a preferences screen needs to show one setting."""

    name: str
    kind: str  # "bool", "int", "optional_int", "float", "str", "str_list", "str_set", "host_list" or "base64"
    default: Any
    description: str
    choices: tuple[str, ...] | None
    minimum: float | None
    maximum: float | None


class SettingsError(ValueError):
    """A value that a setting cannot take; the message names the field and the allowed values."""


class SettingsSaveError(SettingsError):
    """Settings could not be written to disk; the previous file and values are kept."""


class SecretStoreError(RuntimeError):
    """The system keychain could not store or read a secret."""


def describe_settings() -> list[SettingInfo]:
    """The schema of every setting, in declaration order."""
    infos = []
    for f in dataclasses.fields(Settings):
        meta = f.metadata
        infos.append(SettingInfo(
            name=f.name, kind=meta["kind"], default=f.default, description=meta["description"],
            choices=meta.get("choices"), minimum=meta.get("min"), maximum=meta.get("max")))
    return infos


def validate_setting(name: str, value: Any) -> Any:
    """Return `value` converted to the type of setting `name`, or raise SettingsError saying why."""
    f = _FIELDS.get(name)
    if f is None:
        raise SettingsError(f"Unknown setting '{name}'. Known settings: {', '.join(SETTING_NAMES)}.")
    meta = f.metadata
    kind = meta["kind"]
    if kind == "optional_int" and value is None:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise SettingsError(f"Setting '{name}' must be true or false, not {value!r}.")
        return value
    if kind in ("int", "optional_int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise SettingsError(f"Setting '{name}' must be a whole number, not {value!r}.")
        return _check_range(name, value, meta)
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SettingsError(f"Setting '{name}' must be a number, not {value!r}.")
        return _check_range(name, float(value), meta)
    if kind == "str_list":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise SettingsError(f"Setting '{name}' must be a list of text, not {value!r}.")
        if not all(isinstance(item, str) and item for item in value):
            raise SettingsError(f"Setting '{name}' must contain only non-empty text.")
        return tuple(value)[: meta.get("max_items", len(value))]
    if kind == "host_list":
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise SettingsError(f"Setting '{name}' must be a list of host:port, not {value!r}.")
        try:
            return check_hosts(value)
        except HostListError as exc:
            raise SettingsError(f"Setting '{name}': {exc}") from None
    if kind == "str_set":
        if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
            raise SettingsError(f"Setting '{name}' must be a list of names, not {value!r}.")
        if not all(isinstance(item, str) and item for item in value):
            raise SettingsError(f"Setting '{name}' must contain only non-empty names.")
        return frozenset(value)
    if not isinstance(value, str):
        raise SettingsError(f"Setting '{name}' must be text, not {value!r}.")
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise SettingsError(f"Setting '{name}' must be one of {', '.join(choices)}; got {value!r}.")
    max_length = meta.get("max_length")
    if max_length is not None and len(value) > max_length:
        raise SettingsError(f"Setting '{name}' is longer than {max_length} characters.")
    if kind == "base64" and value:
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise SettingsError(f"Setting '{name}' is not base64 text.") from None
    return value


def _check_range(name: str, value: float, meta: Any) -> Any:
    low, high = meta.get("min"), meta.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        raise SettingsError(f"Setting '{name}' must be between {low} and {high}; got {value}.")
    return value


def settings_to_json(settings: Settings) -> dict[str, Any]:
    """The JSON-ready form of `settings` (sets become sorted lists)."""
    data = dataclasses.asdict(settings)
    data["always_approved_tools"] = sorted(settings.always_approved_tools)
    return data


def load_settings(path: Path) -> tuple[Settings, list[str]]:
    """Read settings from `path`; bad or unknown values fall back to defaults with a warning each.

    A file that is not a JSON object is moved aside to `<name>.corrupt-<timestamp>` (so the next
    save cannot overwrite what the user had) and reported in the warnings. Never raises for
    content problems; a missing file gives the defaults with no warning.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_MAX_SETTINGS_FILE_BYTES + 1)
    except FileNotFoundError:
        return Settings(), []
    except OSError as exc:
        return Settings(), [f"Could not read settings file {path} ({exc.strerror}); using defaults."]
    try:
        if len(raw) > _MAX_SETTINGS_FILE_BYTES:
            raise ValueError("file is larger than 1 MiB")
        data = json.loads(raw.decode("utf-8"))
        if not isinstance(data, dict):
            raise ValueError("top level is not a JSON object")
    except (ValueError, UnicodeDecodeError) as exc:
        moved = _move_aside(path)
        where = f"It was moved to {moved}." if moved else "It could not be moved aside."
        return Settings(), [f"Settings file {path} is damaged ({exc}); using defaults. {where}"]
    values: dict[str, Any] = {}
    warnings = []
    for name, value in data.items():
        if name not in _FIELDS:
            warnings.append(f"Unknown setting '{name}' in {path} was ignored.")
            continue
        try:
            values[name] = validate_setting(name, value)
        except SettingsError as exc:
            warnings.append(f"{exc} Using the default, {_FIELDS[name].default!r}.")
    return Settings(**values), warnings


def _move_aside(path: Path) -> Path | None:
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
    try:
        os.replace(path, target)
    except OSError:
        log.exception("could not move damaged settings file %s aside", path)
        return None
    return target


def save_settings(path: Path, settings: Settings) -> None:
    """Write `settings` to `path` atomically: a temp file in the same folder, fsync, then rename."""
    paths.ensure_dir(path.parent)
    text = json.dumps(settings_to_json(settings), indent=2, sort_keys=True) + "\n"
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, path)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is already atomic
    finally:
        os.close(fd)


class SettingsStore(QObject):
    """The live settings: read with `get`/`settings`, change with `set`, which saves and emits `changed`."""

    changed = Signal(str)

    def __init__(self, path: Path | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.path = path if path is not None else paths.settings_path()
        self._settings, self.load_warnings = load_settings(self.path)
        for warning in self.load_warnings:
            log.warning("%s", warning)

    @property
    def settings(self) -> Settings:
        """The current settings (an immutable snapshot)."""
        return self._settings

    def get(self, name: str) -> Any:
        """The current value of setting `name`."""
        if name not in _FIELDS:
            raise SettingsError(f"Unknown setting '{name}'. Known settings: {', '.join(SETTING_NAMES)}.")
        return getattr(self._settings, name)

    def set(self, name: str, value: Any) -> None:
        """Validate and store one setting; saves and emits `changed(name)` if the value changed."""
        self.update({name: value})

    def update(self, values: dict[str, Any]) -> None:
        """Validate all of `values`, save them in one write, then emit `changed` per changed field.

        Raises SettingsError for a bad value and SettingsSaveError if the file cannot be written; in both
        cases nothing changes.
        """
        checked = {name: validate_setting(name, value) for name, value in values.items()}
        changed = [name for name, value in checked.items() if getattr(self._settings, name) != value]
        if not changed:
            return
        new_settings = dataclasses.replace(self._settings, **checked)
        try:
            save_settings(self.path, new_settings)
        except OSError as exc:
            raise SettingsSaveError(f"Could not save settings to {self.path} ({exc.strerror or exc}). Check that "
                                    "the disk has free space and the folder is writable.") from exc
        self._settings = new_settings
        for name in changed:
            self.changed.emit(name)

    def reset(self, name: str) -> None:
        """Put setting `name` back to its default."""
        if name not in _FIELDS:
            raise SettingsError(f"Unknown setting '{name}'. Known settings: {', '.join(SETTING_NAMES)}.")
        self.set(name, _FIELDS[name].default)


def get_secret(name: str) -> str | None:
    """The secret stored under `name` in the system keychain, or None if there is none."""
    try:
        return keyring.get_password(KEYRING_SERVICE, name)
    except keyring.errors.KeyringError as exc:
        raise SecretStoreError(_keyring_message("read", name, exc)) from exc


def set_secret(name: str, value: str) -> None:
    """Store `value` under `name` in the system keychain (never in settings.json)."""
    if not value:
        raise SecretStoreError(f"Refusing to store an empty value for '{name}'; use delete_secret to remove it.")
    try:
        keyring.set_password(KEYRING_SERVICE, name, value)
    except keyring.errors.KeyringError as exc:
        raise SecretStoreError(_keyring_message("store", name, exc)) from exc


def delete_secret(name: str) -> bool:
    """Remove the secret `name` from the keychain; False if there was none."""
    try:
        keyring.delete_password(KEYRING_SERVICE, name)
    except keyring.errors.PasswordDeleteError:
        return False
    except keyring.errors.KeyringError as exc:
        raise SecretStoreError(_keyring_message("delete", name, exc)) from exc
    return True


def _keyring_message(action: str, name: str, exc: Exception) -> str:
    """One short sentence for people; keyring's own (long) text goes to the log."""
    log.warning("keychain: could not %s %s: %s", action, name, exc)
    return (f"The system keychain could not {action} '{name}': on Linux start a Secret Service keyring "
            "such as GNOME Keyring, on macOS allow MoeBar to use the login keychain.")
