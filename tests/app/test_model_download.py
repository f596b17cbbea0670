"""Downloads against a fake Hub on 127.0.0.1: progress with speed and time left, free-space check,
cancel and resume, the check of the files, and the keychain read only for a gated model."""

from __future__ import annotations

import json
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub import FakeHub, FakeRepo

from app.ops import OpContext, Progress
from app.ui import model_download
from app.ui.model_download import (
    VERIFIED_MARKER,
    DownloadCancelled,
    DownloadError,
    NeedsToken,
    RateMeter,
    RepoFile,
    check_repo_id,
    download_model,
    human_duration,
    progress_label,
    verify_download,
)


def safetensors_bytes(payload_bytes: int) -> bytes:
    header = json.dumps({"w": {"dtype": "U8", "shape": [payload_bytes], "data_offsets": [0, payload_bytes]}}).encode()
    return struct.pack("<Q", len(header)) + header + bytes(range(256)) * (payload_bytes // 256)


FILES = {
    "config.json": b'{"model_type": "qwen3_moe"}',
    "model-00001-of-00002.safetensors": safetensors_bytes(1 << 20),
    "model-00002-of-00002.safetensors": safetensors_bytes(1 << 20),
    "tokenizer.json": b"{}",
    "README.md": b"not needed by the engine",
}


@pytest.fixture
def hub() -> Iterator[FakeHub]:
    server = FakeHub({"owner/public": FakeRepo(dict(FILES)), "owner/gated": FakeRepo(dict(FILES), token="hf_right")})
    yield server
    server.stop()


def context(reports: list[Progress], cancel: threading.Event | None = None) -> OpContext:
    return OpContext(reports.append, cancel or threading.Event())


def never_read_keychain() -> str | None:
    raise AssertionError("a public download read the keychain")


def test_public_download_never_reads_the_keychain_and_is_checked(hub: FakeHub, tmp_path: Path) -> None:
    reports: list[Progress] = []
    folder = download_model(context(reports), "owner/public", stored_token=never_read_keychain,
                            target=tmp_path / "m", endpoint=hub.url)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        n for n in FILES if n != "README.md")  # only what the engine needs
    assert (folder / VERIFIED_MARKER).is_file()
    assert all(auth == "" for _, _, auth in hub.requests)  # no token was sent anywhere
    assert reports[-1].label == "Checking the files…" and reports[-1].done == reports[-1].total


def test_gated_model_uses_a_typed_token_or_the_stored_one(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(NeedsToken, match="gated"):
        download_model(context([]), "owner/gated", target=tmp_path / "a", endpoint=hub.url)
    asked: list[bool] = []

    def stored() -> str:
        asked.append(True)
        return "hf_right"

    assert download_model(context([]), "owner/gated", stored_token=stored, target=tmp_path / "b", endpoint=hub.url)
    assert asked == [True]
    # A token typed for this download is used as it is; the keychain is not asked.
    assert download_model(context([]), "owner/gated", token="hf_right", stored_token=never_read_keychain,
                          target=tmp_path / "c", endpoint=hub.url)


def test_progress_has_speed_and_time_left_and_cancel_then_resume(hub: FakeHub, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(model_download, "PROGRESS_INTERVAL_S", 0.05)
    # huggingface_hub reads 10 MB at a time; with 2 MiB files that is one piece per file, so the
    # test reads 64 KiB pieces, as a real multi-GB file's 10 MB pieces are a small part of it.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 16)
    hub.chunk_delay_s = 0.05  # 64 KiB every 50 ms: each weight file takes over 1.6 s
    reports: list[Progress] = []
    cancel = threading.Event()

    def cancel_midway(progress: Progress) -> None:
        reports.append(progress)
        if sum(" left" in r.label for r in reports) >= 2:  # speed and time left shown: now cancel
            cancel.set()

    with pytest.raises(DownloadCancelled):
        download_model(OpContext(cancel_midway, cancel), "owner/public", target=tmp_path / "m", endpoint=hub.url)
    labels = [r.label for r in reports]
    assert any("/s ·" in label and label.endswith(" left") for label in labels), labels
    got_before = max(r.done for r in reports)
    assert not (tmp_path / "m" / VERIFIED_MARKER).exists()
    hub.chunk_delay_s = 0.0
    hub.requests.clear()
    download_model(context([]), "owner/public", target=tmp_path / "m", endpoint=hub.url)
    assert got_before > 0 and (tmp_path / "m" / VERIFIED_MARKER).is_file()


def test_not_enough_free_disk_is_said_before_downloading(hub: FakeHub, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_download, "free_bytes", lambda folder: 1000)
    with pytest.raises(DownloadError, match=r"^owner/public needs 2\.1 MB more free disk: "):
        download_model(context([]), "owner/public", target=tmp_path / "m", endpoint=hub.url)
    assert not any(path.endswith(".safetensors") for _, path, _ in hub.requests)


def test_unknown_repo_and_unreachable_hub_are_sentences(hub: FakeHub, tmp_path: Path) -> None:
    with pytest.raises(NeedsToken, match="was not found"):
        download_model(context([]), "owner/missing", target=tmp_path / "m", endpoint=hub.url)
    with pytest.raises(DownloadError, match="^Could not reach Hugging Face: ") as failed:
        download_model(context([]), "owner/public", target=tmp_path / "m", endpoint="http://127.0.0.1:9")
    assert "\n" not in str(failed.value) and not str(failed.value).endswith(".")


def test_verification_names_the_damaged_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{")
    (tmp_path / "w.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(DownloadError, match="w.safetensors is not a safetensors file"):
        verify_download(tmp_path, [RepoFile("w.safetensors", 64)])
    with pytest.raises(DownloadError, match="w.safetensors has 64 bytes where the Hub lists 65"):
        verify_download(tmp_path, [RepoFile("w.safetensors", 65)])
    with pytest.raises(DownloadError, match="config.json is not valid JSON"):
        verify_download(tmp_path, [RepoFile("config.json", 1)])


def test_rate_time_left_and_labels() -> None:
    meter = RateMeter(window_s=10)
    assert progress_label(0, 1000, meter) == "0 B of 1.0 KB"
    meter.add(0.0, 0)
    meter.add(2.0, 2_000_000)
    assert meter.rate() == pytest.approx(1_000_000)
    assert meter.seconds_left(10_000_000) == pytest.approx(8.0)
    assert progress_label(2_000_000, 10_000_000, meter) == "2.0 MB of 10.0 MB · 1.0 MB/s · 8 s left"
    assert [human_duration(s) for s in (42, 150, 7300)] == ["42 s", "2 min 30 s", "2 h 1 min"]
    assert check_repo_id(" mlx-community/Qwen3-30B-A3B-4bit ") == "mlx-community/Qwen3-30B-A3B-4bit"
    with pytest.raises(ValueError, match="owner/name"):
        check_repo_id("not a repo")


def test_packing_checks_its_own_disk_and_reports_failures(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.ui.model_download import pack_downloaded_model

    folder = tmp_path / "downloaded"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "qwen3_moe"}')
    with monkeypatch.context() as patch:
        patch.setattr(model_download, "free_bytes", lambda path: 10**6)
        with pytest.raises(DownloadError, match=r"^Packing downloaded needs 9\.1 MB more free disk .*works unpacked$"):
            pack_downloaded_model(folder, 10**7)
    with pytest.raises(DownloadError, match=r"^Packing downloaded failed: .*; the model works unpacked$"):
        pack_downloaded_model(folder, 1000)  # the engine's pack refuses a folder without weights
