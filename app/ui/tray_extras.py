"""Additions to the tray menu: the model picker submenu and the local server's line (on/off, requests running)."""

from __future__ import annotations

from app.qt import QtGui, QtWidgets
from app.ui.local_server import LocalServerController
from app.ui.model_picker import ModelMenu, ModelPicker
from app.ui.tray import TrayController


def _action_after(menu: QtWidgets.QMenu, anchor: QtGui.QAction) -> QtGui.QAction | None:
    actions = menu.actions()
    index = actions.index(anchor) if anchor in actions else -1
    return actions[index + 1] if 0 <= index < len(actions) - 1 else None


def install_tray_extras(tray: TrayController, picker: ModelPicker,
                        server: LocalServerController) -> tuple[ModelMenu, QtGui.QAction]:
    """Put "Choose Model" above "Open Chat" and the local server's line under the live figures."""
    menu = tray.menu
    model_menu = ModelMenu(picker, menu)
    menu.insertMenu(tray.open_action, model_menu)
    server_action = QtGui.QAction(server.status_text(), menu)
    server_action.setObjectName("localServerAction")
    server_action.setEnabled(False)  # a read-only line, like the figures
    menu.insertAction(_action_after(menu, tray.pressure_action), server_action)  # type: ignore[arg-type]
    server.status_changed.connect(server_action.setText)
    return model_menu, server_action
