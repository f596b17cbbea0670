"""``moebar-engine selfcheck`` on the CPU: every check passes here, the report is short, a failure
exits non-zero, and the slot-reuse check catches a cache that evicts a slot still being read."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.cli import main
from engine.diagnostics import selfcheck


def test_selfcheck_passes_on_this_machine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["selfcheck", "--work-dir", str(tmp_path), "--disk-dir", str(tmp_path), "--device", "cpu"])
    report = capsys.readouterr().out
    assert rc == 0, report
    lines = report.splitlines()
    assert lines[0].startswith("MoeBar selfcheck") and "MLX" in lines[2] and "RAM" in lines[3]
    for check in ("exactness float32", "exactness bfloat16", "slot reuse", "row independence", "disk", "memory budget"):
        line = next(l for l in lines if check in l)
        assert line.startswith(("PASS", "SKIP")), line  # disk may SKIP where the folder keeps no page cache
    assert "exactness bfloat16" in report and "12 tokens equal mlx-lm's" in report
    assert lines[-1] == "result: all checks passed"
    assert len(lines) <= 12  # short enough to paste into a bug report


def test_a_failing_check_exits_non_zero(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    def broken_disk(directory: Path) -> selfcheck.CheckResult:
        raise OSError("read failed")

    monkeypatch.setattr(selfcheck, "check_disk", broken_disk)
    rc = main(["selfcheck", "--work-dir", str(tmp_path), "--skip", "exactness", "--skip", "slot", "--device", "cpu"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "FAIL  disk: OSError: read failed" in out
    assert "SKIP  slot reuse: skipped on request" in out
    assert out.splitlines()[-1] == "result: FAILED (1 of 6)"


def test_slot_reuse_check_catches_a_cache_that_ignores_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.model.expert_cache import ExpertCache

    assign = ExpertCache.assign
    monkeypatch.setattr(ExpertCache, "assign", lambda self, key, pinned: assign(self, key, set()))
    result = selfcheck.check_slot_reuse(tmp_path)
    assert result.status == "FAIL", result
    assert "of pinned expert" in result.detail
