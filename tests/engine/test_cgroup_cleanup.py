"""Memory cgroups are cleaned up: a half-made one is removed, a busy one is retried and then
reported as a warning of its row (the sweep goes on), and a timed-out row's stderr is text.

Fake cgroup folders (no root needed), as in test_cgroup_sweep.py; rmdir's EBUSY, a failing limit
write and the row's process are simulated.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path
from typing import Any

import pytest

from engine.diagnostics import cgroup_sweep
from engine.diagnostics.cgroup_sweep import run_cgroup_sweep
from engine.platform import cgroup as cgroup_module
from engine.platform.cgroup import LIMIT_FILE, CgroupUnavailable, MemoryCgroup
from test_cgroup_sweep import FakeCgroup, _fake_root, _sweep_args

_real_rmdir = Path.rmdir


def _busy_rmdir(monkeypatch: pytest.MonkeyPatch, busy: Path, times: int) -> list[Path]:
    """rmdir of ``busy`` fails with EBUSY ``times`` times (a cgroup whose process is still exiting)."""
    calls: list[Path] = []

    def rmdir(self: Path) -> None:
        calls.append(self)
        if self == busy and len([c for c in calls if c == busy]) <= times:
            raise OSError(errno.EBUSY, "Device or resource busy", str(self))
        _real_rmdir(self)

    monkeypatch.setattr(Path, "rmdir", rmdir)
    monkeypatch.setattr(cgroup_module.time, "sleep", lambda s: None)
    return calls


def test_a_cgroup_whose_limit_cannot_be_written_is_not_left_behind(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root = _fake_root(tmp_path)
    real_write = Path.write_text

    def write_text(self: Path, data: str, *args: Any, **kwargs: Any) -> int:
        if self.name == LIMIT_FILE and self.parent != root:
            raise OSError(errno.EINVAL, "Invalid argument", str(self))
        return real_write(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write_text)
    with pytest.raises(CgroupUnavailable) as err:
        MemoryCgroup.create(root, "row", 4096)
    assert f"cannot set {LIMIT_FILE} of memory cgroup {root / 'row'} to 4096" in str(err.value)
    assert not (root / "row").exists()


def test_a_busy_cgroup_is_removed_once_its_process_is_gone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg = MemoryCgroup(tmp_path / "row")
    cg.path.mkdir()
    calls = _busy_rmdir(monkeypatch, cg.path, times=2)
    cg.remove()
    assert calls == [cg.path] * 3 and not cg.path.exists()


def test_a_cgroup_busy_past_the_retries_raises_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cg = MemoryCgroup(tmp_path / "row")
    cg.path.mkdir()
    calls = _busy_rmdir(monkeypatch, cg.path, times=100)
    monkeypatch.setattr(MemoryCgroup, "REMOVE_ATTEMPTS", 4)
    with pytest.raises(OSError) as err:
        cg.remove()
    assert err.value.errno == errno.EBUSY and str(cg.path) in str(err.value) and len(calls) == 4


class _Proc:
    returncode = 0
    stdout = '{"hit_rate": 0.5, "disk_bytes_per_token": 0, "page_cache_bytes_per_token": 0, "decode_tps": 1.0}\n'
    stderr = ""


def test_a_busy_cgroup_is_a_warning_of_its_row_and_the_sweep_goes_on(
    tiny_model: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _fake_root(tmp_path)
    made: list[MemoryCgroup] = []

    def make(r: Path, name: str, limit: int) -> MemoryCgroup:
        made.append(FakeCgroup.create(r, name, limit))
        if len(made) == 1:
            _busy_rmdir(monkeypatch, made[0].path, times=10**6)  # the first row's cgroup never empties
        return made[-1]

    monkeypatch.setattr(cgroup_sweep.subprocess, "run", lambda cmd, **kw: _Proc())
    r = run_cgroup_sweep(_sweep_args(), tiny_model("qwen3_moe", 4), [0.0, 1.0], root=root, make_cgroup=make)
    first, second = r["rows"]
    assert first["ok"] and second["ok"] and len(made) == 2
    assert str(made[0].path) in first["warning"] and "busy" in first["warning"]
    assert "warning" not in second and not made[1].path.exists()
    assert f"bench: warning: cannot remove memory cgroup {made[0].path}" in capsys.readouterr().err


def test_a_timed_out_row_keeps_its_stderr_as_text(tiny_model: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def run(cmd: list[str], **kw: Any) -> None:
        raise subprocess.TimeoutExpired(cmd, kw["timeout"], output=b"", stderr=b"reading layer 3 \xe2\x80\x94 slow\n")

    monkeypatch.setattr(cgroup_sweep.subprocess, "run", run)
    r = run_cgroup_sweep(_sweep_args(), tiny_model("qwen3_moe", 4), [0.5], root=_fake_root(tmp_path),
                         make_cgroup=FakeCgroup.create, row_timeout_s=1.0)
    (row,) = r["rows"]
    assert not row["ok"] and row["returncode"] is None
    assert row["stderr_tail"] == "reading layer 3 \u2014 slow\n"
