"""Settings: typed schema, validation on load, atomic save, change signal, secrets in keyring."""

from __future__ import annotations

import json
import os
from pathlib import Path

import keyring
import keyring.backend
import keyring.errors
import pytest

from app import settings as settings_module
from app.settings import (
    HF_TOKEN_SECRET,
    SETTING_NAMES,
    SecretStoreError,
    Settings,
    SettingsError,
    SettingsStore,
    delete_secret,
    describe_settings,
    get_secret,
    load_settings,
    save_settings,
    set_secret,
    validate_setting,
)


class MemoryKeyring(keyring.backend.KeyringBackend):
    """A keyring that keeps secrets in a dict, so tests never touch a real keychain."""

    priority = 1  # type: ignore[assignment]

    def __init__(self) -> None:
        super().__init__()
        self.secrets: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.secrets.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.secrets[(service, username)] = password

    def delete_password(self, service: str, username: str) -> None:
        if (service, username) not in self.secrets:
            raise keyring.errors.PasswordDeleteError("not found")
        del self.secrets[(service, username)]


@pytest.fixture
def memory_keyring():
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    yield backend
    keyring.set_keyring(previous)


@pytest.fixture
def settings_path(tmp_path: Path) -> Path:
    return tmp_path / "config" / "settings.json"


def test_missing_file_gives_defaults_without_warnings(settings_path: Path) -> None:
    loaded, warnings = load_settings(settings_path)
    assert loaded == Settings()
    assert warnings == []


def test_save_then_load_round_trips_every_field(settings_path: Path) -> None:
    custom = Settings(
        model_dir="/models/qwen", cache_mb=8192, experts_per_token=4, cold_mode=True, theme="dark",
        system_prompt="Be brief.\nUse tools.", temperature=0.2, top_p=0.5, max_tokens=123, thinking=False,
        always_approved_tools=frozenset({"read_file", "list_folder"}), window_geometry="AdnQywADAAA=",
        hf_repo_last_used="Qwen/Qwen3-30B-A3B")
    save_settings(settings_path, custom)
    loaded, warnings = load_settings(settings_path)
    assert warnings == []
    assert loaded == custom
    on_disk = json.loads(settings_path.read_text())
    assert on_disk["always_approved_tools"] == ["list_folder", "read_file"]
    assert set(on_disk) == set(SETTING_NAMES)


BAD_VALUES = [
    ("cache_mb", "lots"), ("cache_mb", -1), ("cache_mb", 1.5), ("cache_mb", True),
    ("experts_per_token", 0), ("experts_per_token", "4"), ("cold_mode", "yes"), ("cold_mode", 1),
    ("theme", "purple"), ("theme", 3), ("temperature", -0.1), ("temperature", 9), ("temperature", "hot"),
    ("top_p", 0), ("top_p", 1.5), ("max_tokens", 0), ("max_tokens", None), ("thinking", None),
    ("always_approved_tools", "read_file"), ("always_approved_tools", [1, 2]), ("always_approved_tools", [""]),
    ("window_geometry", "not base64!!"), ("model_dir", ["a"]), ("system_prompt", {"a": 1}),
    ("hf_repo_last_used", "x" * 201),
]


@pytest.mark.parametrize(("name", "value"), BAD_VALUES)
def test_bad_value_in_file_falls_back_to_default_with_warning_naming_field(
        settings_path: Path, name: str, value: object) -> None:
    settings_path.parent.mkdir(parents=True)
    settings_path.write_text(json.dumps({name: value, "theme": "light"} if name != "theme" else {name: value}))
    loaded, warnings = load_settings(settings_path)
    assert getattr(loaded, name) == getattr(Settings(), name)
    assert len(warnings) == 1 and f"'{name}'" in warnings[0] and "default" in warnings[0]
    if name != "theme":
        assert loaded.theme == "light"  # the good values next to a bad one are kept


def test_nan_temperature_is_refused() -> None:
    with pytest.raises(SettingsError, match="'temperature' must be a number"):
        validate_setting("temperature", float("nan"))


def test_unknown_key_is_ignored_with_warning(settings_path: Path) -> None:
    settings_path.parent.mkdir(parents=True)
    settings_path.write_text(json.dumps({"huggingface_token": "hf_secret", "theme": "dark"}))
    loaded, warnings = load_settings(settings_path)
    assert loaded.theme == "dark"
    assert warnings == [f"Unknown setting 'huggingface_token' in {settings_path} was ignored."]


@pytest.mark.parametrize("content", [b"{not json", b"\x00\xff\xfe garbage", b"[1, 2, 3]", b'"text"', b""])
def test_damaged_file_is_moved_aside_not_overwritten(settings_path: Path, content: bytes) -> None:
    settings_path.parent.mkdir(parents=True)
    settings_path.write_bytes(content)
    loaded, warnings = load_settings(settings_path)
    assert loaded == Settings()
    assert len(warnings) == 1 and "damaged" in warnings[0] and "moved to" in warnings[0]
    assert not settings_path.exists()
    moved = list(settings_path.parent.glob("settings.json.corrupt-*"))
    assert len(moved) == 1 and moved[0].read_bytes() == content


def test_unreadable_file_gives_defaults_and_a_warning(settings_path: Path) -> None:
    settings_path.mkdir(parents=True)  # a folder where the file should be: open() fails
    loaded, warnings = load_settings(settings_path)
    assert loaded == Settings()
    assert len(warnings) == 1 and "Could not read settings file" in warnings[0]


def test_failed_save_keeps_the_old_file_and_leaves_no_temp_file(
        settings_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_settings(settings_path, Settings(theme="dark"))
    before = settings_path.read_bytes()

    def broken_replace(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(settings_module.os, "replace", broken_replace)
    with pytest.raises(OSError):
        save_settings(settings_path, Settings(theme="light"))
    assert settings_path.read_bytes() == before
    assert sorted(p.name for p in settings_path.parent.iterdir()) == ["settings.json"]


def test_store_set_saves_and_emits_changed_with_field_name(qtbot, settings_path: Path) -> None:
    store = SettingsStore(settings_path)
    with qtbot.waitSignal(store.changed, timeout=1000) as blocker:
        store.set("temperature", 0.3)
    assert blocker.args == ["temperature"]
    assert store.get("temperature") == 0.3
    assert load_settings(settings_path)[0].temperature == 0.3


def test_store_set_same_value_emits_nothing_and_writes_nothing(qtbot, settings_path: Path) -> None:
    store = SettingsStore(settings_path)
    with qtbot.assertNotEmitted(store.changed):
        store.set("theme", "system")
    assert not settings_path.exists()


def test_store_refuses_invalid_value_without_saving_or_emitting(qtbot, settings_path: Path) -> None:
    store = SettingsStore(settings_path)
    with qtbot.assertNotEmitted(store.changed), pytest.raises(SettingsError, match="'theme' must be one of"):
        store.set("theme", "neon")
    with pytest.raises(SettingsError, match="Unknown setting 'colour'"):
        store.set("colour", "red")
    assert store.get("theme") == "system"
    assert not settings_path.exists()


def test_store_update_is_all_or_nothing_and_emits_once_per_changed_field(qtbot, settings_path: Path) -> None:
    store = SettingsStore(settings_path)
    seen: list[str] = []
    store.changed.connect(seen.append)
    with pytest.raises(SettingsError):
        store.update({"theme": "dark", "max_tokens": -5})
    assert store.settings == Settings() and seen == []
    store.update({"theme": "dark", "max_tokens": 100, "thinking": True})
    assert sorted(seen) == ["max_tokens", "theme"]  # thinking was already True


def test_store_reset_restores_default(qtbot, settings_path: Path) -> None:
    store = SettingsStore(settings_path)
    store.set("always_approved_tools", ["read_file"])
    assert store.get("always_approved_tools") == frozenset({"read_file"})
    store.reset("always_approved_tools")
    assert store.get("always_approved_tools") == frozenset()


def test_store_reports_load_warnings(qtbot, settings_path: Path) -> None:
    settings_path.parent.mkdir(parents=True)
    settings_path.write_text(json.dumps({"max_tokens": "many"}))
    store = SettingsStore(settings_path)
    assert store.get("max_tokens") == Settings().max_tokens
    assert len(store.load_warnings) == 1 and "'max_tokens'" in store.load_warnings[0]


def test_schema_describes_every_field() -> None:
    infos = describe_settings()
    assert [info.name for info in infos] == list(SETTING_NAMES)
    assert all(info.description for info in infos)
    theme = next(info for info in infos if info.name == "theme")
    assert theme.choices == ("light", "dark", "system")
    temperature = next(info for info in infos if info.name == "temperature")
    assert (temperature.kind, temperature.minimum, temperature.maximum) == ("float", 0.0, 2.0)
    for info in infos:  # every default passes its own validation
        assert validate_setting(info.name, info.default) == info.default


def test_secret_round_trip_in_keyring_and_never_in_json(memory_keyring: MemoryKeyring, settings_path: Path) -> None:
    assert get_secret(HF_TOKEN_SECRET) is None
    set_secret(HF_TOKEN_SECRET, "hf_abcdefSECRET")
    assert get_secret(HF_TOKEN_SECRET) == "hf_abcdefSECRET"
    assert memory_keyring.secrets == {("MoeBar", HF_TOKEN_SECRET): "hf_abcdefSECRET"}
    store = SettingsStore(settings_path)
    store.set("hf_repo_last_used", "Qwen/Qwen3-30B-A3B")
    assert "hf_abcdefSECRET" not in settings_path.read_text()
    assert delete_secret(HF_TOKEN_SECRET) is True
    assert delete_secret(HF_TOKEN_SECRET) is False
    assert get_secret(HF_TOKEN_SECRET) is None


def test_secret_with_plaintext_file_keyring(tmp_path: Path) -> None:
    from keyrings.alt.file import PlaintextKeyring

    backend = PlaintextKeyring()
    backend.file_path = str(tmp_path / "keyring.cfg")  # type: ignore[misc]
    previous = keyring.get_keyring()
    keyring.set_keyring(backend)
    try:
        set_secret(HF_TOKEN_SECRET, "hf_file_token")
        assert get_secret(HF_TOKEN_SECRET) == "hf_file_token"
        assert os.path.exists(backend.file_path)
    finally:
        keyring.set_keyring(previous)


def test_empty_secret_is_refused(memory_keyring: MemoryKeyring) -> None:
    with pytest.raises(SecretStoreError, match="delete_secret"):
        set_secret(HF_TOKEN_SECRET, "")


def test_missing_keyring_gives_actionable_error() -> None:
    from keyring.backends.fail import Keyring as FailKeyring

    previous = keyring.get_keyring()
    keyring.set_keyring(FailKeyring())
    try:
        with pytest.raises(SecretStoreError, match="Secret Service keyring"):
            set_secret(HF_TOKEN_SECRET, "hf_x")
        with pytest.raises(SecretStoreError, match="could not read"):
            get_secret(HF_TOKEN_SECRET)
    finally:
        keyring.set_keyring(previous)


def test_store_save_failure_raises_actionable_error_and_keeps_values(
        qtbot, settings_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import SettingsSaveError

    store = SettingsStore(settings_path)

    def full_disk(path: Path, settings: Settings) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(settings_module, "save_settings", full_disk)
    with qtbot.assertNotEmitted(store.changed), pytest.raises(SettingsSaveError, match="No space left on device"):
        store.set("theme", "dark")
    assert store.get("theme") == "system"
