"""Showing text the model (or a file, or the engine) controls in Qt widgets, as text only.

A QLabel or tooltip given a string that merely *looks* like HTML renders it as rich text, and
Qt's rich text loads images from local paths (`<img src=/dev/zero>` reads the device until
memory runs out). Every label that can show such text is set to plain text, and tooltips are
escaped.
"""

from __future__ import annotations

import html

from app.qt import Qt, QtWidgets


def plain_label(label: QtWidgets.QLabel) -> QtWidgets.QLabel:
    """Make `label` show its text literally, never as rich text; returns it."""
    label.setTextFormat(Qt.TextFormat.PlainText)
    return label


def escaped_tooltip(text: str) -> str:
    """A tooltip string that shows `text` literally (tooltips have no plain-text switch)."""
    if not text:
        return ""
    return "<qt>" + html.escape(text).replace("\n", "<br>") + "</qt>"


def button_text(text: str) -> str:
    """`text` for a button label: '&' shown as itself rather than as a keyboard mnemonic."""
    return text.replace("&", "&&")
