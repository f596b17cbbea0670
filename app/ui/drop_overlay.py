"""The overlay shown while files are dragged over the window, and the drop's verdict."""

from __future__ import annotations

import html
from pathlib import Path

from app.qt import Qt, QtCore, QtGui, QtWidgets
from app.tools import DEFAULT_LIMITS, human_size
from app.ui.safe_text import plain_label
from app.ui.theme import LIGHT, Theme


def drop_rules_text() -> str:
    """What a drop accepts, in one sentence."""
    return (
        f"Text files up to {human_size(DEFAULT_LIMITS.max_file_bytes)} and folders. "
        "The model's file tools can read only what you drop here, and only to read."
    )


def local_paths(mime: QtCore.QMimeData) -> list[str]:
    """The local file paths carried by a drag (remote URLs are left out)."""
    if not mime.hasUrls():
        return []
    return [url.toLocalFile() for url in mime.urls() if url.isLocalFile() and url.toLocalFile()]


class DropOverlay(QtWidgets.QWidget):
    """Covers its parent while a drag is over it: what will be accepted, and which files come."""

    def __init__(self, parent: QtWidgets.QWidget, theme: Theme = LIGHT) -> None:
        super().__init__(parent)
        self.setObjectName("dropOverlay")
        self._theme = theme
        self.setAttribute(Qt.WidgetAttribute.WA_TransparentForMouseEvents)
        self.title = QtWidgets.QLabel("Drop files for the tools", self)
        self.title.setObjectName("dropTitle")
        self.title.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.rules = QtWidgets.QLabel(drop_rules_text(), self)
        self.rules.setObjectName("dropRules")
        self.rules.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.rules.setWordWrap(True)
        self.files = plain_label(QtWidgets.QLabel(self))  # file names may look like HTML
        self.files.setObjectName("dropFiles")
        self.files.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.files.setWordWrap(True)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(60, 60, 60, 60)
        layout.addStretch(1)
        layout.addWidget(self.title)
        layout.addWidget(self.rules)
        layout.addWidget(self.files)
        layout.addStretch(1)
        self.hide()

    def show_for(self, paths: list[str]) -> None:
        """Cover the parent and list the files being dragged."""
        names = [Path(p).name or p for p in paths]
        shown = ", ".join(html.escape(n) for n in names[:8])
        if len(names) > 8:
            shown += f" and {len(names) - 8} more"
        self.files.setText(shown)
        parent = self.parentWidget()
        if parent is not None:
            self.setGeometry(parent.rect())
        self.raise_()
        self.show()

    def set_theme(self, theme: Theme) -> None:
        """Repaint in `theme`."""
        self._theme = theme
        self.update()

    def paintEvent(self, event: QtGui.QPaintEvent) -> None:  # noqa: N802 (Qt override)
        """A translucent veil with a dashed frame."""
        painter = QtGui.QPainter(self)
        painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        veil = QtGui.QColor("#0d1117" if self._theme.name == "dark" else "#ffffff")
        veil.setAlpha(225)
        painter.fillRect(self.rect(), veil)
        pen = QtGui.QPen(QtGui.QColor(self._theme.accent), 2.5, Qt.PenStyle.DashLine)
        painter.setPen(pen)
        painter.drawRoundedRect(QtCore.QRectF(self.rect()).adjusted(16, 16, -16, -16), 14, 14)
        painter.end()


def rejection_text(rejected: list[tuple[Path, str]]) -> str:
    """One line naming each refused file and why."""
    return "Not added: " + "; ".join(f"{path.name or path} — {reason}" for path, reason in rejected)
