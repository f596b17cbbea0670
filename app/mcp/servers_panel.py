"""The MCP section of Settings: each server's state with Restart and Disable, its tools to switch on or off, imports."""

from __future__ import annotations

from pathlib import Path

from app.mcp.config import McpConfigError, known_import_sources
from app.mcp.hub import ServerState
from app.mcp.service import McpService
from app.qt import QtCore, QtGui, QtWidgets, Slot


class ServerRow(QtWidgets.QFrame):
    """One server: name and state, Restart, Disable/Enable, its log, and its tools with a check box each."""

    def __init__(self, service: McpService, name: str, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.service = service
        self.name = name
        self.setObjectName("mcpServerRow")
        self.setFrameShape(QtWidgets.QFrame.Shape.StyledPanel)
        self.title = QtWidgets.QLabel(self)
        self.state_label = QtWidgets.QLabel(self)
        self.state_label.setWordWrap(True)
        self.state_label.setObjectName("statusLabel")
        self.restart_button = QtWidgets.QPushButton("Restart", self)
        self.disable_button = QtWidgets.QPushButton(self)
        self.log_button = QtWidgets.QPushButton("Log", self)
        self.restart_button.clicked.connect(lambda: self.service.restart(self.name))
        self.disable_button.clicked.connect(self._toggle_disabled)
        self.log_button.clicked.connect(self._open_log)
        self.tools = QtWidgets.QListWidget(self)
        self.tools.setObjectName("mcpTools")
        self.tools.itemChanged.connect(self._on_tool_changed)
        header = QtWidgets.QHBoxLayout()
        header.addWidget(self.title, 1)
        header.addWidget(self.restart_button)
        header.addWidget(self.disable_button)
        header.addWidget(self.log_button)
        layout = QtWidgets.QVBoxLayout(self)
        layout.addLayout(header)
        layout.addWidget(self.state_label)
        layout.addWidget(self.tools)
        self.show_state(service.states().get(name))

    def show_state(self, state: ServerState | None) -> None:
        """Show the server's configuration and its latest state."""
        server = self.service.config.servers.get(self.name)
        if server is None:
            return
        self.title.setText(f"<b>{self.name}</b> — {server.describe()[:80]}")
        status = "disabled" if server.disabled else (state.summary() if state is not None else "not started")
        self.state_label.setText(status)
        self.state_label.setProperty("status", "error" if status.startswith("failed") else "ok")
        self.state_label.style().unpolish(self.state_label)
        self.state_label.style().polish(self.state_label)
        self.disable_button.setText("Enable" if server.disabled else "Disable")
        self.tools.blockSignals(True)
        self.tools.clear()
        for tool in (state.tools if state is not None and state.status == "ready" else ()):
            item = QtWidgets.QListWidgetItem(tool.name, self.tools)
            item.setToolTip(tool.description)
            item.setFlags(item.flags() | QtCore.Qt.ItemFlag.ItemIsUserCheckable)
            item.setCheckState(QtCore.Qt.CheckState.Unchecked if tool.name in server.disabled_tools
                               else QtCore.Qt.CheckState.Checked)
        self.tools.blockSignals(False)
        self.tools.setVisible(self.tools.count() > 0)
        self.tools.setFixedHeight(min(6, self.tools.count()) * 22 + 6)

    @Slot()
    def _toggle_disabled(self) -> None:
        server = self.service.config.servers[self.name]
        try:
            self.service.set_disabled(self.name, not server.disabled)
        except (McpConfigError, OSError) as exc:
            QtWidgets.QMessageBox.warning(self, "MCP servers", str(exc))

    @Slot(QtWidgets.QListWidgetItem)
    def _on_tool_changed(self, item: QtWidgets.QListWidgetItem) -> None:
        enabled = item.checkState() == QtCore.Qt.CheckState.Checked
        try:
            self.service.set_tool_enabled(self.name, item.text(), enabled)
        except (McpConfigError, OSError) as exc:
            QtWidgets.QMessageBox.warning(self, "MCP servers", str(exc))

    @Slot()
    def _open_log(self) -> None:
        path = self.service.hub.log_path(self.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(exist_ok=True)
        QtGui.QDesktopServices.openUrl(QtCore.QUrl.fromLocalFile(str(path)))


class McpServersPanel(QtWidgets.QWidget):
    """Every configured server as a row, the file's problems, and buttons to import, open and reload mcp.json."""

    def __init__(self, service: McpService, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.service = service
        self.rows: dict[str, ServerRow] = {}
        self.problems = QtWidgets.QLabel(self)
        self.problems.setWordWrap(True)
        self.problems.setObjectName("statusLabel")
        self.problems.setProperty("status", "error")
        self.empty = QtWidgets.QLabel(f"No MCP servers are configured. Add them to {service.config.path} "
                                      "(the mcpServers format of Claude Desktop and LM Studio) or import them.", self)
        self.empty.setWordWrap(True)
        self.note = QtWidgets.QLabel(self)  # what an import did
        self.note.setWordWrap(True)
        self.note.hide()
        self.rows_box = QtWidgets.QVBoxLayout()
        buttons = QtWidgets.QHBoxLayout()
        self.import_buttons: dict[str, QtWidgets.QPushButton] = {}
        for app_name, path in known_import_sources().items():
            button = QtWidgets.QPushButton(f"Import from {app_name}", self)
            button.setEnabled(path.is_file())
            button.setToolTip(str(path))
            button.clicked.connect(lambda _checked=False, source=path: self.import_from(source))
            self.import_buttons[app_name] = button
            buttons.addWidget(button)
        self.open_button = QtWidgets.QPushButton("Edit mcp.json", self)
        self.open_button.clicked.connect(self._open_config)
        self.reload_button = QtWidgets.QPushButton("Reload", self)
        self.reload_button.clicked.connect(self.service.reload)
        buttons.addWidget(self.open_button)
        buttons.addWidget(self.reload_button)
        buttons.addStretch(1)
        layout = QtWidgets.QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.problems)
        layout.addWidget(self.empty)
        layout.addLayout(self.rows_box)
        layout.addLayout(buttons)
        layout.addWidget(self.note)
        service.state_changed.connect(self._on_state)
        service.config_changed.connect(self.rebuild)
        self.rebuild()

    @Slot()
    def rebuild(self) -> None:
        """One row per configured server, in the file's order (rows are kept when the servers are the same)."""
        names = list(self.service.config.servers)
        if names == list(self.rows):
            states = self.service.states()
            for name, row in self.rows.items():
                row.show_state(states.get(name))
            self._show_problems()
            return
        for row in self.rows.values():
            row.setParent(None)  # type: ignore[call-overload]
            row.deleteLater()
        self.rows = {}
        for name in self.service.config.servers:
            row = ServerRow(self.service, name, self)
            self.rows[name] = row
            self.rows_box.addWidget(row)
        self._show_problems()

    def _show_problems(self) -> None:
        problems = self.service.problems
        self.problems.setText("\n".join(problems))
        self.problems.setVisible(bool(problems))
        self.empty.setVisible(not self.rows and not problems)

    def import_from(self, source: Path) -> tuple[list[str], list[str]]:
        """Import another app's servers; says what was added and what was not."""
        try:
            added, problems = self.service.import_from(source)
        except (McpConfigError, OSError) as exc:
            added, problems = [], [str(exc)]
        lines = [f"Imported from {source}: {', '.join(added)}." if added else f"No new servers in {source}."]
        self.note.setText("\n".join(lines + problems))
        self.note.show()
        return added, problems

    @Slot(object)
    def _on_state(self, state: ServerState) -> None:
        row = self.rows.get(state.name)
        if row is not None:
            row.show_state(state)

    @Slot()
    def _open_config(self) -> None:
        path = self.service.config.path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text('{\n  "mcpServers": {}\n}\n', encoding="utf-8")
        QtGui.QDesktopServices.openUrl(QtCore.QUrl.fromLocalFile(str(path)))
