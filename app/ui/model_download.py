"""Downloading a model from Hugging Face in a background op: free-space check first, then
progress with speed and time left, cancel, resume, and a check of the files at the end.

`snapshot_download` skips files that are complete and resumes partial ones, so pressing
Download again after a failure or a cancel continues where it stopped. Public models are
fetched without a token; the keychain is read only when the Hub says the model is gated or
private and no token was typed for this download.
"""

from __future__ import annotations

import io
import json
import re
import shutil
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app import paths
from app.ops import OpContext
from app.ui.format import human_bytes

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Only what the engine needs: weights, configs, tokenizer and chat template.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.py"]
PROGRESS_INTERVAL_S = 0.5
RATE_WINDOW_S = 8.0  # speed is averaged over this much of the recent past
MAX_SAFETENSORS_HEADER = 100 * 2**20
VERIFIED_MARKER = ".moebar-download.json"  # written into a model folder once its download was checked


class DownloadCancelled(Exception):
    """The user pressed Cancel; partial files stay for the next attempt."""


class DownloadError(Exception):
    """A download that cannot go on, said in one sentence for people."""


class NeedsToken(DownloadError):
    """The Hub refused the model without a token (gated or private)."""


@dataclass(frozen=True)
class RepoFile:
    """One file of a model repository that the engine needs, with its size on the Hub."""

    name: str
    size: int


def check_repo_id(repo_id: str) -> str:
    """Return `repo_id` stripped, or raise ValueError saying what a valid one looks like."""
    value = repo_id.strip()
    if not REPO_ID.match(value):
        raise ValueError(f"'{value}' is not a Hugging Face model id; it looks like 'owner/name', "
                         "e.g. 'mlx-community/Qwen3-30B-A3B-4bit'.")
    return value


def download_dir_for(repo_id: str) -> Path:
    """Where a downloaded repository is kept (under the cache folder)."""
    return paths.cache_dir() / "models" / repo_id.replace("/", "--")


def sentence(error: BaseException) -> str:
    """The first line of an error's text, without a trailing period (to end a sentence with)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text.strip().rstrip(".")


def list_repo_files(repo_id: str, token: str | None, endpoint: str | None = None) -> list[RepoFile]:
    """The files of `repo_id` that a download fetches, with their sizes; raises DownloadError."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError
    from huggingface_hub.utils import filter_repo_objects

    try:
        info = HfApi(endpoint=endpoint).model_info(repo_id, files_metadata=True, token=token or None)
    except GatedRepoError:
        raise NeedsToken(f"{repo_id} is gated: accept its terms on huggingface.co and paste an access token") from None
    except RepositoryNotFoundError:
        if token:
            raise DownloadError(f"{repo_id} was not found on Hugging Face (or this token cannot see it)") from None
        raise NeedsToken(f"{repo_id} was not found on Hugging Face; if it is private, paste an access token") from None
    except Exception as exc:  # noqa: BLE001 - network and HTTP errors of several libraries
        raise DownloadError(f"Could not reach Hugging Face: {sentence(exc)}") from exc
    siblings = [RepoFile(s.rfilename, int(s.size or 0)) for s in (info.siblings or [])]
    return list(filter_repo_objects(siblings, allow_patterns=ALLOW_PATTERNS, key=lambda f: f.name))


def bytes_on_disk(target: Path, files: list[RepoFile]) -> int:
    """Bytes of `files` already in `target`: complete files plus partial downloads in its cache."""
    done = 0
    for f in files:
        path = target / f.name
        if path.is_file() and path.stat().st_size == f.size:
            done += f.size
    partial = target / ".cache" / "huggingface" / "download"
    if partial.is_dir():
        done += sum(p.stat().st_size for p in partial.rglob("*.incomplete") if p.is_file())
    return done


def free_bytes(folder: Path) -> int:
    """Free bytes on the disk that holds `folder` (or its nearest existing parent)."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def disk_shortfall(needed: int, free: int) -> int:
    """How many more free bytes `needed` takes (0 if it fits); 1% of the need is kept spare."""
    return max(0, int(needed * 1.01) - free)


def not_enough_disk(name: str, needed: int, free: int, folder: Path) -> str:
    """The sentence for a download that does not fit on the disk."""
    return (f"{name} needs {human_bytes(disk_shortfall(needed, free))} more free disk: {human_bytes(needed)} "
            f"to download and {human_bytes(free)} free on the disk of {folder}")


def verify_download(target: Path, files: list[RepoFile]) -> None:
    """Check every file is there at the Hub's size and every weight file's header reads; DownloadError if not."""
    for f in files:
        path = target / f.name
        if not path.is_file():
            raise DownloadError(f"{f.name} is missing after the download; press Download to fetch it")
        size = path.stat().st_size
        if size != f.size:
            raise DownloadError(f"{f.name} has {size} bytes where the Hub lists {f.size}; press Download to fetch it again")
        if f.name.endswith(".safetensors"):
            _check_safetensors_header(path)
        elif f.name.endswith(".json"):
            try:
                json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise DownloadError(f"{f.name} is not valid JSON ({sentence(exc)})") from None


def _check_safetensors_header(path: Path) -> None:
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if not 0 < length <= min(MAX_SAFETENSORS_HEADER, path.stat().st_size - 8):
            raise DownloadError(f"{path.name} is not a safetensors file (bad header length)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise DownloadError(f"{path.name} has an unreadable safetensors header") from None
    if not isinstance(header, dict):
        raise DownloadError(f"{path.name} has an unreadable safetensors header")


class RateMeter:
    """Download speed over the last few seconds and the time left at that speed."""

    def __init__(self, window_s: float = RATE_WINDOW_S) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, done: int) -> None:
        """Record that `done` bytes were on disk at time `now`."""
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Bytes per second, or None before two samples are a moment apart."""
        if len(self._samples) < 2:
            return None
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else None

    def seconds_left(self, total: int) -> float | None:
        """Time to `total` at the current rate (None while the rate is unknown or zero)."""
        rate = self.rate()
        if not rate or rate <= 0:
            return None
        return max(0.0, (total - self._samples[-1][1]) / rate)


def human_duration(seconds: float) -> str:
    """A time left: 42 -> '42 s', 150 -> '2 min 30 s', 7300 -> '2 h 1 min'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s" if s < 600 else f"{s // 60} min"
    return f"{s // 3600} h {s % 3600 // 60} min"


def progress_label(done: int, total: int, meter: RateMeter) -> str:
    """'1.2 GB of 4.0 GB · 35.0 MB/s · 1 min 20 s left' (speed and time once known)."""
    parts = [f"{human_bytes(done)} of {human_bytes(total)}"]
    rate = meter.rate()
    if rate is not None and rate > 0:
        parts.append(f"{human_bytes(rate)}/s")
        left = meter.seconds_left(total)
        if left is not None:
            parts.append(f"{human_duration(left)} left")
    return " · ".join(parts)


def cancelling_tqdm(ctx: OpContext) -> type:
    """A silent tqdm class for huggingface_hub that stops the download when the op is cancelled."""
    from tqdm.auto import tqdm

    class CancellingTqdm(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["file"] = io.StringIO()  # no terminal output from a GUI app
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if ctx.cancelled:
                raise DownloadCancelled("download cancelled")
            return super().update(n)  # type: ignore[no-any-return]

    return CancellingTqdm


def _watch_progress(ctx: OpContext, target: Path, files: list[RepoFile], total: int,
                    stop: threading.Event) -> None:
    meter = RateMeter()
    while not stop.wait(PROGRESS_INTERVAL_S):
        done = min(total, bytes_on_disk(target, files))
        meter.add(time.monotonic(), done)
        ctx.report(done, total, progress_label(done, total, meter))


def download_model(
    ctx: OpContext,
    repo_id: str,
    token: str | None = None,
    stored_token: Callable[[], str | None] | None = None,
    target: Path | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download (or resume) `repo_id` into `target` (the cache by default), check it, return the folder.

    `token` is one typed for this download; `stored_token` reads the keychain and is called
    only when the Hub refuses the model without a token. Raises DownloadError (a sentence),
    DownloadCancelled, or the keychain's SecretStoreError from `stored_token`.
    """
    from huggingface_hub import snapshot_download

    repo_id = check_repo_id(repo_id)
    target = target or download_dir_for(repo_id)
    ctx.report(0, None, f"Asking Hugging Face about {repo_id}…")
    try:
        files = list_repo_files(repo_id, token, endpoint)
    except NeedsToken:
        if token or stored_token is None:
            raise
        token = stored_token()
        if not token:
            raise
        files = list_repo_files(repo_id, token, endpoint)
    if not files:
        raise DownloadError(f"{repo_id} has no safetensors weights or configs to download")
    total = sum(f.size for f in files)
    (target / VERIFIED_MARKER).unlink(missing_ok=True)  # checked again at the end
    present = bytes_on_disk(target, files)
    free = free_bytes(target)
    if disk_shortfall(total - present, free):
        raise DownloadError(not_enough_disk(repo_id, total - present, free, target))
    paths.ensure_dir(target)
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_progress, args=(ctx, target, files, total, stop), daemon=True)
    watcher.start()
    try:
        # cache_dir inside the model folder: the revision it records stays with the model, not in ~/.cache.
        snapshot_download(repo_id, local_dir=target, cache_dir=target / ".cache" / "hub", token=token or None,
                          allow_patterns=ALLOW_PATTERNS, tqdm_class=cancelling_tqdm(ctx), endpoint=endpoint)
    except DownloadCancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - network, HTTP and disk errors of several libraries
        if ctx.cancelled:
            raise DownloadCancelled("download cancelled") from exc
        raise DownloadError(f"Download of {repo_id} stopped: {sentence(exc)}") from exc
    finally:
        stop.set()
        watcher.join(timeout=5)
    ctx.report(total, total, "Checking the files…")
    verify_download(target, files)
    (target / VERIFIED_MARKER).write_text(json.dumps({"repo": repo_id, "bytes": total}) + "\n", encoding="utf-8")
    return target


PACK_TIMEOUT_S = 6 * 3600


def pack_downloaded_model(folder: Path, expert_bytes_total: int) -> Path:
    """Write the packed expert layout (one read per expert) with `moebar-engine pack`, after a disk check."""
    import subprocess

    from app.ui.model_manager import engine_python_command

    free = free_bytes(folder)
    if disk_shortfall(expert_bytes_total, free):
        raise DownloadError(f"Packing {folder.name} needs {human_bytes(disk_shortfall(expert_bytes_total, free))} "
                            f"more free disk ({human_bytes(expert_bytes_total)} for the packed experts, "
                            f"{human_bytes(free)} free); the model works unpacked")
    done = subprocess.run(engine_python_command("-m", "engine.cli", "pack", str(folder), "--quiet"),
                          capture_output=True, text=True, timeout=PACK_TIMEOUT_S)
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1].removeprefix("error: ").rstrip(".")
        raise DownloadError(f"Packing {folder.name} failed: {tail}; the model works unpacked")
    return folder
