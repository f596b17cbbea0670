"""The one place the app imports Qt from, so a binding change touches a single file.

UI and core modules write `from app.qt import QObject, Signal` instead of importing PySide6.
Add a name here when a module needs it; keep the list alphabetical within each group.
"""

from __future__ import annotations

from PySide6 import QtCore, QtGui, QtNetwork, QtWidgets
from PySide6.QtCore import (
    QCoreApplication,
    QMetaObject,
    QObject,
    QRunnable,
    Qt,
    QThread,
    QThreadPool,
    QTimer,
    Signal,
    Slot,
)
from shiboken6 import isValid as is_alive  # False once the C++ side of a Qt object was deleted

__all__ = [
    "QCoreApplication",
    "QMetaObject",
    "QObject",
    "QRunnable",
    "Qt",
    "QThread",
    "QThreadPool",
    "QTimer",
    "QtCore",
    "QtGui",
    "QtNetwork",
    "QtWidgets",
    "Signal",
    "Slot",
    "is_alive",
]
