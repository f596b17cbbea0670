"""Help > Check This Mac…: runs ``moebar-engine selfcheck`` in a subprocess and shows its report,
ready to copy into a bug report. MLX never loads into the app process."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass

from app.ops import BackgroundOp, OpContext
from app.qt import QtGui, QtWidgets, Slot
from app.ui.model_manager import engine_python_command

SELFCHECK_TIMEOUT_S = 900


@dataclass(frozen=True)
class SelfcheckReport:
    """What the selfcheck printed and whether every check passed."""

    text: str
    passed: bool


def selfcheck_command() -> list[str]:
    """The command that runs the selfcheck with this app's interpreter."""
    return engine_python_command("-m", "engine.cli", "selfcheck")


def run_selfcheck(command: list[str], timeout_s: float = SELFCHECK_TIMEOUT_S) -> SelfcheckReport:
    """Run the selfcheck; its stdout is the report (stderr's last lines are added when it crashed)."""
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return SelfcheckReport(f"The self-check did not finish within {timeout_s:.0f} s.", False)
    except OSError as e:
        return SelfcheckReport(f"The self-check could not be started ({' '.join(command)}): {e}", False)
    text = done.stdout.strip()
    if not text:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        text = f"The self-check stopped with exit code {done.returncode} and no report.\n{tail}".strip()
    return SelfcheckReport(text, done.returncode == 0)


class SelfcheckDialog(QtWidgets.QDialog):
    """Shows the self-check running, then its report with a Copy button."""

    def __init__(self, parent: QtWidgets.QWidget | None = None,
                 command: Callable[[], list[str]] = selfcheck_command) -> None:  # fmt: skip
        super().__init__(parent)
        self.setWindowTitle("Check This Mac")
        self.setObjectName("selfcheckDialog")
        self.resize(760, 420)
        self._command = command
        self._op: BackgroundOp[SelfcheckReport] | None = None
        self.status = QtWidgets.QLabel(self)
        self.status.setWordWrap(True)
        self.report = QtWidgets.QPlainTextEdit(self)
        self.report.setReadOnly(True)
        self.report.setFont(QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.SystemFont.FixedFont))
        self.copy_button = QtWidgets.QPushButton("Copy Report", self)
        self.copy_button.setEnabled(False)
        self.copy_button.clicked.connect(self.copy_report)
        self.run_button = QtWidgets.QPushButton("Run Again", self)
        self.run_button.clicked.connect(self.start)
        close = QtWidgets.QPushButton("Close", self)
        close.clicked.connect(self.reject)
        buttons = QtWidgets.QHBoxLayout()
        buttons.addWidget(self.copy_button)
        buttons.addWidget(self.run_button)
        buttons.addStretch(1)
        buttons.addWidget(close)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addWidget(self.status)
        layout.addWidget(self.report, 1)
        layout.addLayout(buttons)

    @Slot()
    def start(self) -> None:
        """Run the self-check in the background (a minute or two: it builds and runs tiny models)."""
        if self._op is not None:
            return
        self.status.setText("Checking exactness, the expert slots, the disk and the memory budget… "
                            "(a minute or two)")  # fmt: skip
        self.report.setPlainText("")
        self.copy_button.setEnabled(False)
        self.run_button.setEnabled(False)
        command = self._command()

        def work(ctx: OpContext) -> SelfcheckReport:
            return run_selfcheck(command)

        self._op = BackgroundOp(self, work, self._done, self._failed).run()

    def _done(self, result: SelfcheckReport) -> None:
        self._op = None
        self.report.setPlainText(result.text)
        self.status.setText("All checks passed." if result.passed
                            else "Some checks failed: please attach this report to a bug report.")  # fmt: skip
        self.copy_button.setEnabled(True)
        self.run_button.setEnabled(True)

    def _failed(self, error: BaseException) -> None:
        self._done(SelfcheckReport(f"The self-check could not run: {error}", False))

    @Slot()
    def copy_report(self) -> None:
        """Put the report on the clipboard."""
        QtWidgets.QApplication.clipboard().setText(self.report.toPlainText())
