"""Several Macs from the app: the controller that makes the engine rank 0 of the hosts, and the Settings panel.

The controller writes the hostfile into the config folder and gives the engine process
MLX_RANK=0 and MLX_HOSTFILE (restarting it when the hosts change), follows each host's state from
the engine's events, and rewords a lost peer as a sentence naming the Mac. The panel edits the host
list and the switch, shows each host's state and the command to paste on each other Mac.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from app.bridge import EngineBridge
from app.frozen import ENGINE_STDIO_FLAG, is_frozen
from app.qt import QObject, QtGui, QtWidgets, Signal, Slot
from app.settings import SettingsError, SettingsStore
from app.several_macs import (
    OTHER_MAC_ENGINE,
    PEER_LOST,
    HostListError,
    HostStates,
    engine_environment,
    hostfile_path,
    hostfile_text,
    is_active,
    other_mac_command,
    parse_hosts,
    peer_lost_sentence,
    write_hostfile,
)
from engine.serving.protocol import ErrorEvent, LoadedEvent

log = logging.getLogger(__name__)

SEVERAL_MACS_SETTINGS = ("several_macs_enabled", "several_macs_hosts")
HOSTS_PLACEHOLDER = "10.0.0.1:5100   (this Mac, rank 0)\n10.0.0.2:5100"
SETUP_NOTE = (
    "Each Mac reads and runs its share of every layer's experts from its own disk. Every Mac needs the same "
    "model at the same path. Join the Macs with a Thunderbolt cable and give each Thunderbolt Bridge a fixed "
    "address (System Settings → Network); then run the command below on each other Mac."
)


def other_mac_engine() -> tuple[str, ...]:
    """How another Mac starts its engine: this app's own engine command in a bundle, else `moebar-engine stdio`."""
    return (sys.executable, ENGINE_STDIO_FLAG) if is_frozen() else OTHER_MAC_ENGINE


class SeveralMacsController(QObject):
    """Keeps the engine process in line with the several-Macs settings and tracks each host's state."""

    states_changed = Signal()
    failed = Signal(str)

    def __init__(self, bridge: EngineBridge, settings: SettingsStore, hostfile: Path | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        self.hostfile = hostfile if hostfile is not None else hostfile_path()
        self.states = HostStates()
        self._worded_hosts: tuple[str, ...] = ()  # read by the bridge's thread (replaced whole, never changed)
        self._applied: tuple[dict[str, str], str] | None = None  # environment and hostfile text in use
        bridge.set_error_wording(self._word_error)
        settings.changed.connect(self._on_setting_changed)
        bridge.loaded.connect(self._on_loaded)
        bridge.peer_lost.connect(self._on_peer_lost)
        self.apply()

    @property
    def active(self) -> bool:
        """Whether the engine runs as rank 0 of several Macs."""
        s = self.settings.settings
        return is_active(s.several_macs_enabled, s.several_macs_hosts)

    def apply(self) -> None:
        """Write the hostfile and give the engine its environment; a change restarts a running engine."""
        s = self.settings.settings
        hosts = s.several_macs_hosts if self.active else ()
        text = hostfile_text(hosts) if hosts else ""
        environment = engine_environment(s.several_macs_enabled, s.several_macs_hosts, self.hostfile)
        if self._applied == (environment, text):
            return
        if hosts:
            try:
                write_hostfile(self.hostfile, hosts)
            except OSError as exc:
                self.failed.emit(f"Several Macs: the hostfile {self.hostfile} could not be written "
                                 f"({exc.strerror or exc}); the engine runs on this Mac alone.")
                hosts, text, environment = (), "", {}
        first = self._applied is None
        self._applied = (environment, text)
        self._worded_hosts = tuple(hosts)
        self.states.reset(hosts)
        if not (first and not environment):  # nothing to change in an engine that never had any
            log.info("engine environment for several Macs: %s", environment or "none (this Mac alone)")
            self.bridge.set_engine_environment(environment)
        self.states_changed.emit()

    def commands(self, hosts: tuple[str, ...] | None = None) -> list[tuple[int, str, str]]:
        """(rank, host, shell lines) for every other Mac, of `hosts` or else of the saved list."""
        hosts = self.settings.settings.several_macs_hosts if hosts is None else hosts
        engine = other_mac_engine()
        return [(rank, hosts[rank], other_mac_command(rank, hosts, engine)) for rank in range(1, len(hosts))]

    def _word_error(self, event: ErrorEvent) -> str:
        """The engine's error as the app shows it (runs in the bridge's thread)."""
        if event.code == PEER_LOST:
            return peer_lost_sentence(self._worded_hosts)
        return event.message

    @Slot(str)
    def _on_setting_changed(self, name: str) -> None:
        if name in SEVERAL_MACS_SETTINGS:
            self.apply()

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        if self.active:
            self.states.loaded(event.ranks)
            self.states_changed.emit()

    @Slot(str)
    def _on_peer_lost(self, message: str) -> None:
        log.warning("several Macs: a rank stopped answering: %s", message)
        if self.active:
            self.states.peer_lost(message)
            self.states_changed.emit()


class SeveralMacsPanel(QtWidgets.QWidget):
    """The Settings section: the switch, the hosts (this Mac first), each host's state, the other Macs' commands."""

    def __init__(self, settings: SettingsStore, controller: SeveralMacsController,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self.controller = controller
        s = settings.settings
        self.enabled = QtWidgets.QCheckBox("Run the model on several Macs (expert parallelism)", self)
        self.enabled.setChecked(s.several_macs_enabled)
        self.hosts = QtWidgets.QPlainTextEdit("\n".join(s.several_macs_hosts), self)
        self.hosts.setObjectName("severalMacsHosts")
        self.hosts.setPlaceholderText(HOSTS_PLACEHOLDER)
        self.hosts.setFixedHeight(70)
        self.hosts.setToolTip("One host:port a line, this Mac first (rank 0). Any free port; the same on every Mac "
                              "is fine.")
        self.error = QtWidgets.QLabel(self)
        self.error.setObjectName("statusLabel")
        self.error.setProperty("status", "error")
        self.error.setWordWrap(True)
        self.error.hide()
        self.note = QtWidgets.QLabel(SETUP_NOTE, self)
        self.note.setWordWrap(True)
        self.state_list = QtWidgets.QListWidget(self)
        self.state_list.setObjectName("severalMacsStates")
        self.state_list.setFixedHeight(70)
        self.commands = QtWidgets.QPlainTextEdit(self)
        self.commands.setObjectName("severalMacsCommands")
        self.commands.setReadOnly(True)
        self.commands.setFont(QtGui.QFontDatabase.systemFont(QtGui.QFontDatabase.SystemFont.FixedFont))
        self.commands.setLineWrapMode(QtWidgets.QPlainTextEdit.LineWrapMode.NoWrap)  # lines pasted whole
        self.commands.setFixedHeight(90)
        self.copy = QtWidgets.QPushButton("Copy the commands", self)
        self.copy.clicked.connect(self._copy_commands)
        form = QtWidgets.QFormLayout(self)
        form.addRow("", self.enabled)
        form.addRow("Hosts:", self.hosts)
        form.addRow("", self.error)
        form.addRow("State:", self.state_list)
        form.addRow("", self.note)
        form.addRow("On the other Macs:", self.commands)
        form.addRow("", self.copy)
        self.hosts.textChanged.connect(self._refresh)
        self.enabled.toggled.connect(self._refresh)
        controller.states_changed.connect(self._show_states)
        self._refresh()
        self._show_states()

    def problem(self) -> str | None:
        """Why the hosts as typed cannot be saved (naming the line), or None."""
        try:
            hosts = parse_hosts(self.hosts.toPlainText())
        except HostListError as exc:
            return f"Several Macs: {exc}"
        if self.enabled.isChecked() and len(hosts) < 2:
            return "Several Macs: list this Mac and at least one other Mac (host:port, one a line), or switch it off."
        return None

    def save(self) -> None:
        """Store the switch and the hosts (the controller then writes the hostfile and restarts the engine)."""
        problem = self.problem()
        if problem is not None:
            self.controller.failed.emit(f"{problem} The Several Macs settings were not saved.")
            return
        try:
            self.settings.update({"several_macs_enabled": self.enabled.isChecked(),
                                  "several_macs_hosts": list(parse_hosts(self.hosts.toPlainText()))})
        except SettingsError as exc:
            self.controller.failed.emit(f"The Several Macs settings were not saved: {exc}")

    def command_text(self) -> str:
        """The commands shown for the other Macs, each under a line naming its host and rank."""
        return self.commands.toPlainText()

    @Slot()
    def _refresh(self) -> None:
        problem = self.problem()
        self.error.setText(problem or "")
        self.error.setVisible(problem is not None)
        hosts = () if problem is not None else parse_hosts(self.hosts.toPlainText())
        blocks = [f"# On the Mac at {host} (rank {rank}):\n{lines}"
                  for rank, host, lines in self.controller.commands(hosts)]
        self.commands.setPlainText("\n\n".join(blocks))
        self.copy.setEnabled(bool(blocks))

    @Slot()
    def _show_states(self) -> None:
        self.state_list.clear()
        rows = self.controller.states.rows()
        if not rows:
            self.state_list.addItem("Off: the model runs on this Mac alone.")
        for row in rows:
            self.state_list.addItem(row.text())

    @Slot()
    def _copy_commands(self) -> None:
        clipboard = QtWidgets.QApplication.clipboard()
        if clipboard is not None:
            clipboard.setText(self.command_text())

