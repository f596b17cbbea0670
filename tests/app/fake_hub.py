"""A Hugging Face Hub stand-in on 127.0.0.1 for download tests (no network here).

It answers the few routes huggingface_hub's snapshot_download and model_info use: repository
info, the file tree, and file downloads with HEAD, ETag and Range (resume). A repository can be
gated (401 without the right bearer token) and downloads can be slowed down (to test progress
and cancel). Every request is recorded.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeRepo:
    """Files of one model repository; `token` set makes it gated."""

    files: dict[str, bytes]
    token: str | None = None


@dataclass
class FakeHub:
    """Serves `repos` until stop(); `url` is its endpoint."""

    repos: dict[str, FakeRepo]
    chunk_delay_s: float = 0.0  # pause after each 64 KiB sent
    requests: list[tuple[str, str, str]] = field(default_factory=list)  # (method, path, authorization)

    def __post_init__(self) -> None:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:  # noqa: N802
                hub._answer(self, body=False)

            def do_GET(self) -> None:  # noqa: N802
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Stop serving."""
        self.server.shutdown()
        self.server.server_close()

    # ---------------------------------------------------------------- routes

    def _answer(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = h.path.split("?")[0]
        auth = h.headers.get("authorization", "")
        self.requests.append((h.command, path, auth))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/[^/]+(?:/.*)?", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path)
        match = info or tree or resolve
        repo = self.repos.get(match.group(1)) if match else None
        if match is None or repo is None:
            self._json(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}, body)
            return
        if repo.token is not None and auth != f"Bearer {repo.token}":
            self._json(h, 401, {"error": "Access to this model is restricted."},
                       {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to this model is restricted."}, body)
            return
        if info:
            siblings = [{"rfilename": n, "size": len(d)} for n, d in sorted(repo.files.items())]
            self._json(h, 200, {"id": match.group(1), "modelId": match.group(1), "sha": COMMIT, "private": False,
                                "gated": repo.token is not None, "siblings": siblings}, {}, body)
        elif tree:
            entries = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                       for n, d in sorted(repo.files.items())]
            self._json(h, 200, entries, {}, body)
        else:
            self._file(h, repo, resolve.group(2) if resolve else "", body)

    def _json(self, h: BaseHTTPRequestHandler, status: int, obj: Any, headers: dict[str, str], body: bool) -> None:
        data = json.dumps(obj).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        h.send_header("X-Repo-Commit", COMMIT)
        for key, value in headers.items():
            h.send_header(key, value)
        h.end_headers()
        if body:
            h.wfile.write(data)

    def _file(self, h: BaseHTTPRequestHandler, repo: FakeRepo, name: str, body: bool) -> None:
        data = repo.files.get(name)
        if data is None:
            self._json(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"}, body)
            return
        start = 0
        ranged = re.fullmatch(r"bytes=(\d+)-", h.headers.get("range", ""))
        if ranged:
            start = int(ranged.group(1))
        part = data[start:]
        h.send_response(206 if ranged else 200)
        h.send_header("Content-Length", str(len(part)))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("X-Repo-Commit", COMMIT)
        h.send_header("Accept-Ranges", "bytes")
        if ranged:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if not body:
            return
        try:
            for offset in range(0, len(part), 1 << 16):
                h.wfile.write(part[offset:offset + (1 << 16)])
                if self.chunk_delay_s:
                    time.sleep(self.chunk_delay_s)
        except (BrokenPipeError, ConnectionResetError):
            pass
