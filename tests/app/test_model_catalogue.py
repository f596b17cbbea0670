"""The model catalogue and the Model dialog's download box: the data file, the per-machine
verdicts, one click from the list to a loaded model (download from a fake Hub on 127.0.0.1,
check, optional pack, plan, load), and a keychain that does not work."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keyring
import keyring.backend
import keyring.errors
import pytest
from fake_hub import FakeHub, FakeRepo
from test_first_minutes import fake_plans
from test_model_download import FILES

from app.catalogue import CatalogueError, CatalogueModel, download_state, load_catalogue, verdict
from app.main import MoeBarApp
from app.qt import QtGui, QtWidgets
from app.ui.catalogue_view import MachineFacts
from app.ui.model_download import download_dir_for

GB = 10**9


def model(**changes: Any) -> CatalogueModel:
    values: dict[str, Any] = dict(repo="owner/public", name="Tiny MoE", summary="for tests", model_type="qwen3_moe",
                                  download_bytes=2_200_000, dense_bytes=100_000, expert_bytes=10_000, moe_layers=2,
                                  experts_per_layer=100, experts_per_token=4)
    values.update(changes)
    return CatalogueModel(**values)


def test_the_bundled_catalogue_reads_and_ends_with_the_target() -> None:
    models = load_catalogue()
    assert len(models) >= 4 and models[-1].repo == "mlx-community/Qwen3.5-397B-A17B-4bit"
    target = models[-1]
    assert target.moe_layers == 60 and target.experts_per_layer == 512 and target.experts_per_token == 10
    assert abs(target.expert_bytes_per_token - 4.25 * GB) < 0.01 * GB  # DESIGN.md: 4.25 GB per token at K=10
    assert [m.download_bytes for m in models] == sorted(m.download_bytes for m in models)
    for m in models:
        assert m.dense_bytes + m.expert_bytes_total <= m.download_bytes < 1.05 * (m.dense_bytes + m.expert_bytes_total)


def test_bad_entries_are_named(tmp_path: Path) -> None:
    path = tmp_path / "models.json"
    good = json.loads(json.dumps(model().__dict__))
    for field, value, needle in (("expert_bytes", 0, "models[0].expert_bytes must be a positive whole number"),
                                 ("repo", "", "models[0].repo must be a non-empty string"),
                                 ("experts_per_token", 101, "experts_per_token (101) exceeds")):
        path.write_text(json.dumps({"models": [{**good, field: value}]}))
        with pytest.raises(CatalogueError, match=re.escape(needle)):
            load_catalogue(path)
    path.write_text("{")
    with pytest.raises(CatalogueError, match="cannot read the model catalogue"):
        load_catalogue(path)


def test_verdicts_for_this_machine() -> None:
    target = load_catalogue()[-1]
    assert verdict(target, 48 * GB, 400 * GB, 0, 5.5e9).text == "streams from the SSD at about 1.3 tok/s"
    assert verdict(target, 48 * GB, 100 * GB, 0, 5.5e9).text == "needs 125.2 GB more free disk"
    assert verdict(target, 48 * GB, 100 * GB, target.download_bytes, 5.5e9).kind == "streams"  # downloaded already
    assert verdict(target, 512 * GB, 400 * GB, 0, None).text == "fits in RAM"
    assert verdict(target, 4 * GB, 400 * GB, 0, 5.5e9).kind == "needs_ram"
    assert "not measured" in verdict(target, 48 * GB, 400 * GB, 0, None).text


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub({"owner/public": FakeRepo(dict(FILES)), "owner/gated": FakeRepo(dict(FILES), token="hf_right")})
    yield server
    server.stop()


def open_dialog(qtbot: Any, app: MoeBarApp, hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                catalogue: list[CatalogueModel], facts: MachineFacts) -> Any:
    from app.ui.model_dialog import ModelDialog

    monkeypatch.setattr("app.ui.catalogue_view.load_catalogue", lambda: catalogue)
    monkeypatch.setattr("app.ui.model_dialog.machine_facts", lambda root, rate: facts)
    fake_plans(monkeypatch)
    dialog = ModelDialog(app.settings, app.models, app.window)
    qtbot.addWidget(dialog)
    dialog.downloads.endpoint = hub.url
    dialog.show()
    return dialog


def test_one_click_from_the_catalogue_to_a_loaded_model(qtbot, moebar: MoeBarApp, hub: FakeHub,  # noqa: F811
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    dialog = open_dialog(qtbot, moebar, hub, monkeypatch, [model()], MachineFacts(10 * GB, 100 * GB, 1e9))
    view = dialog.downloads.catalogue
    assert view.table.topLevelItem(0).text(2) == "fits in RAM" and view.table.topLevelItem(0).text(3) == ""
    view.select("owner/public")
    assert view.get_button.text() == "Download and load"
    view.get_button.click()
    folder = download_dir_for("owner/public")
    qtbot.waitUntil(lambda: moebar.settings.get("model_dir") == str(folder), timeout=30_000)
    assert download_state(folder) == "downloaded" and not dialog.isVisible()
    assert all(auth == "" for _, _, auth in hub.requests)


def test_a_model_that_streams_is_offered_packing(qtbot, moebar: MoeBarApp, hub: FakeHub,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    packed: list[tuple[Path, int]] = []
    monkeypatch.setattr("app.ui.model_dialog.pack_downloaded_model",
                        lambda folder, size: packed.append((folder, size)) or folder)
    monkeypatch.setattr("app.ui.model_dialog.ModelDialog.ask_to_pack", lambda self, m: True)
    small_ram = MachineFacts(ram_available=1_000_000, free_disk=100 * GB, disk_read_bytes_per_s=2e9)
    dialog = open_dialog(qtbot, moebar, hub, monkeypatch, [model()], small_ram)
    view = dialog.downloads.catalogue
    assert view.table.topLevelItem(0).text(2) == "streams from the SSD at about 25000 tok/s"
    view.select("owner/public")
    view.get_button.click()
    folder = download_dir_for("owner/public")
    qtbot.waitUntil(lambda: moebar.settings.get("model_dir") == str(folder), timeout=30_000)
    assert packed == [(folder, model().expert_bytes_total)]


def test_too_little_disk_turns_the_button_off(qtbot, moebar: MoeBarApp, hub: FakeHub,  # noqa: F811
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    dialog = open_dialog(qtbot, moebar, hub, monkeypatch, [model()], MachineFacts(10 * GB, 1000, 1e9))
    view = dialog.downloads.catalogue
    view.select("owner/public")
    assert view.table.topLevelItem(0).text(2).startswith("needs 2.2 MB more free disk")
    assert not view.get_button.isEnabled()


class BrokenKeyring(keyring.backend.KeyringBackend):
    """A keychain that fails like keyring does on Linux without a Secret Service, with a long message."""

    priority = 1  # type: ignore[assignment]
    calls = 0

    def _fail(self) -> None:
        BrokenKeyring.calls += 1
        raise keyring.errors.KeyringError("No recommended backend was available. " * 40)

    def get_password(self, service: str, username: str) -> str | None:
        self._fail()
        return None

    def set_password(self, service: str, username: str, password: str) -> None:
        self._fail()

    def delete_password(self, service: str, username: str) -> None:
        self._fail()


@pytest.fixture
def broken_keyring() -> Iterator[type[BrokenKeyring]]:
    previous = keyring.get_keyring()
    BrokenKeyring.calls = 0
    keyring.set_keyring(BrokenKeyring())
    yield BrokenKeyring
    keyring.set_keyring(previous)


def test_no_keychain_public_downloads_and_a_token_used_once(qtbot, moebar: MoeBarApp, hub: FakeHub,  # noqa: F811
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            broken_keyring: type[BrokenKeyring]) -> None:
    dialog = open_dialog(qtbot, moebar, hub, monkeypatch, [], MachineFacts(10 * GB, 100 * GB, 1e9))
    panel = dialog.downloads
    screen = QtGui.QGuiApplication.primaryScreen().availableGeometry().width()
    assert broken_keyring.calls == 0  # opening the dialog does not touch the keychain
    panel.repo_edit.setText("owner/public")
    panel.download_button.click()
    qtbot.waitUntil(lambda: moebar.settings.get("model_dir") == str(download_dir_for("owner/public")), timeout=30_000)
    assert broken_keyring.calls == 0  # a public model never needs the keychain

    dialog = open_dialog(qtbot, moebar, hub, monkeypatch, [], MachineFacts(10 * GB, 100 * GB, 1e9))
    panel = dialog.downloads
    panel.repo_edit.setText("owner/gated")
    panel.download_button.click()  # no token typed: the keychain is asked, fails, and that is one sentence
    qtbot.waitUntil(lambda: bool(dialog.error_label.text()), timeout=30_000)
    assert dialog.error_label.text() == ("owner/gated needs an access token and the system keychain cannot be read: "
                                         "paste a token above; it is used for this download without being saved.")
    assert dialog.width() <= screen and dialog.load_button.isVisible()
    panel.token_edit.setText("hf_right")
    panel.save_token_box.setChecked(True)
    panel.download_button.click()  # saving fails, the token is still used for this download
    assert panel.note.text() == ("The system keychain is not available here, so tokens cannot be saved; "
                                 "the token is used for this download only.")
    qtbot.waitUntil(lambda: moebar.settings.get("model_dir") == str(download_dir_for("owner/gated")), timeout=30_000)
    assert any(auth == "Bearer hf_right" for _, _, auth in hub.requests)
    dialog.error_label_text("x" * 3000 + " " + "a very long message " * 200)
    QtWidgets.QApplication.processEvents()
    assert dialog.width() <= screen


def test_the_disk_is_measured_with_a_scratch_file_that_is_removed(tmp_path: Path) -> None:
    from app.ui import catalogue_view

    rate = catalogue_view.measure_disk_rate(tmp_path, size=8 * 2**20)
    assert rate > 0 and catalogue_view.session_disk_rate() == rate
    assert list(tmp_path.iterdir()) == []


def test_keychain_errors_are_one_short_sentence(broken_keyring: type[BrokenKeyring]) -> None:
    from app.settings import SecretStoreError, get_secret

    with pytest.raises(SecretStoreError) as failed:
        get_secret("huggingface_token")
    text = str(failed.value)
    assert len(text) < 200 and text.count(". ") == 0 and "No recommended backend" not in text
