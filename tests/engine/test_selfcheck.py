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
    for check in ("exactness float32", "exactness bfloat16", "slot reuse", "row independence", "large array", "disk",
                  "disk read pieces", "memory pressure", "memory budget"):
        line = next(l for l in lines if check in l)
        assert line.startswith(("PASS", "SKIP")), line  # disk may SKIP where the folder keeps no page cache
    assert "exactness bfloat16" in report and "12 tokens equal mlx-lm's" in report
    assert lines[-1] == "result: all checks passed"
    assert len(lines) <= 14  # short enough to paste into a bug report


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
    assert out.splitlines()[-1] == "result: FAILED (1 of 9)"


def test_slot_reuse_check_catches_a_cache_that_ignores_pins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.model.expert_cache import ExpertCache

    assign = ExpertCache.assign
    monkeypatch.setattr(ExpertCache, "assign", lambda self, key, pinned: assign(self, key, set()))
    result = selfcheck.check_slot_reuse(tmp_path)
    assert result.status == "FAIL", result
    assert "of pinned expert" in result.detail


def test_the_disk_check_reports_whether_the_disk_gauge_counted_the_read(tmp_path: Path) -> None:
    result = selfcheck.check_disk(tmp_path, size=16 << 20)
    if result.status == "SKIP":  # a folder without a page cache (tmpfs) cannot be read cold
        pytest.skip(result.detail)
    assert "disk gauge: " in result.detail and "of 16 MiB read" in result.detail


def test_disk_gauge_verdicts() -> None:
    mib = 2**20
    assert selfcheck.disk_gauge_verdict("disk3", 64 * mib, 64 * mib) == "disk gauge: disk3 counted 64 MiB of 64 MiB read"
    assert selfcheck.disk_gauge_verdict("disk0+disk3", 40 * mib, 64 * mib).startswith("disk gauge: disk0+disk3")
    assert selfcheck.disk_gauge_verdict("disk3", 2 * mib, 64 * mib) == (
        "FAIL disk gauge: disk3 counted only 2 MiB of the 64 MiB read")
    assert selfcheck.disk_gauge_verdict(None, 64 * mib, 64 * mib).startswith("FAIL disk gauge: no disk found")


def test_a_disk_gauge_that_misses_the_read_fails_the_disk_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import platform_info

    monkeypatch.setattr(platform_info, "disk_read_counters",
                        lambda path, *a, **k: platform_info.DiskReadCounters("disk9", 0, 0, 0))
    result = selfcheck.check_disk(tmp_path, size=8 << 20)
    if result.status == "SKIP":
        pytest.skip(result.detail)
    assert result.status == "FAIL" and "disk9 counted only 0 MiB of the 8 MiB read" in result.detail


def test_memory_pressure_check_on_macos_needs_the_sysctl(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import platform_info as pi

    monkeypatch.setattr(pi, "sysctl_int", lambda name: {pi.MACOS_PRESSURE_SYSCTL: 2}[name])
    monkeypatch.setattr(pi.macos_memory_pressure, "__defaults__", (pi.sysctl_int,))
    ok = selfcheck.check_memory_pressure("darwin")
    assert ok.status == "PASS" and "warning (raw 2 from kern.memorystatus_vm_pressure_level" in ok.detail

    def missing(name: str) -> int:
        raise OSError(2, f"sysctlbyname({name}) failed: No such file or directory")

    monkeypatch.setattr(pi.macos_memory_pressure, "__defaults__", (missing,))
    bad = selfcheck.check_memory_pressure("darwin")
    assert bad.status == "FAIL" and "could not be read" in bad.detail and "psutil.virtual_memory" in bad.detail


def test_memory_pressure_check_on_linux_names_its_source() -> None:
    result = selfcheck.check_memory_pressure("linux")
    assert result.status == "PASS"
    assert "/proc/pressure/memory" in result.detail or "available RAM stands in" in result.detail
