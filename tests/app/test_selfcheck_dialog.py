"""Help > Check This Mac…: the dialog runs the self-check command and shows its report."""

from __future__ import annotations

import sys
from pathlib import Path

from app.ui.selfcheck_dialog import SelfcheckDialog, run_selfcheck, selfcheck_command


def _script(tmp_path: Path, report: str, code: int) -> list[str]:
    path = tmp_path / "fake_selfcheck.py"
    path.write_text(f"import sys\nprint({report!r})\nsys.exit({code})\n")
    return [sys.executable, str(path)]


def test_dialog_shows_a_failed_report_and_copies_it(qtbot, tmp_path: Path) -> None:
    report = "MoeBar selfcheck\nFAIL  disk: eviction did not work\nresult: FAILED (1 of 6)"
    dialog = SelfcheckDialog(command=lambda: _script(tmp_path, report, 1))
    qtbot.addWidget(dialog)
    dialog.start()
    qtbot.waitUntil(lambda: dialog.copy_button.isEnabled(), timeout=30_000)
    assert dialog.report.toPlainText() == report
    assert "failed" in dialog.status.text()
    dialog.copy_report()
    from app.qt import QtWidgets

    assert QtWidgets.QApplication.clipboard().text() == report


def test_run_selfcheck_reports_a_crash_and_a_missing_command(tmp_path: Path) -> None:
    crashed = tmp_path / "crash.py"
    crashed.write_text("import sys\nsys.stderr.write('Traceback\\nImportError: no mlx\\n')\nsys.exit(3)\n")
    r = run_selfcheck([sys.executable, str(crashed)])
    assert not r.passed and "exit code 3" in r.text and "ImportError: no mlx" in r.text
    r = run_selfcheck([str(tmp_path / "absent")])
    assert not r.passed and "could not be started" in r.text
    assert selfcheck_command()[-3:] == ["-m", "engine.cli", "selfcheck"]


def test_main_window_has_the_help_entry(main_window) -> None:
    actions = [a.text() for a in main_window.help_menu.actions()]
    assert "Check This Mac…" in actions
