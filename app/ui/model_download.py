"""Downloading a model from Hugging Face in a background op, with progress, cancel and resume.

`snapshot_download` skips files that are complete and resumes partial ones, so pressing
Download again after a failure or a cancel continues where it stopped.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

from app import paths
from app.ops import OpContext

REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# Only what the engine needs: weights, configs, tokenizer and chat template.
ALLOW_PATTERNS = ["*.safetensors", "*.json", "*.txt", "*.model", "*.jinja", "*.py"]


class DownloadCancelled(Exception):
    """The user pressed Cancel; partial files stay for the next attempt."""


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


def reporting_tqdm(ctx: OpContext) -> type:
    """A tqdm class that forwards progress to `ctx` and stops when the op is cancelled."""
    from tqdm.auto import tqdm

    class ReportingTqdm(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = False  # counting must happen even when bars are switched off
            kwargs["file"] = io.StringIO()  # no terminal output from a GUI app
            super().__init__(*args, **kwargs)

        def update(self, n: float | None = 1) -> bool | None:
            if ctx.cancelled:
                raise DownloadCancelled("download cancelled")
            result = super().update(n)
            total = int(self.total) if self.total else None
            ctx.report(int(self.n), total, str(self.desc or "Downloading"))
            return result

    return ReportingTqdm


def download_model(ctx: OpContext, repo_id: str, token: str | None) -> Path:
    """Download (or resume) `repo_id` into the cache; returns the model folder."""
    from huggingface_hub import snapshot_download

    repo_id = check_repo_id(repo_id)
    target = download_dir_for(repo_id)
    paths.ensure_dir(target)
    folder = snapshot_download(
        repo_id,
        local_dir=target,
        token=token or None,
        allow_patterns=ALLOW_PATTERNS,
        tqdm_class=reporting_tqdm(ctx),
    )
    return Path(str(folder))
