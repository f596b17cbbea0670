"""The local server from the app: a Settings panel, the controller that asks the engine to serve, the tray line.

The engine process itself serves the OpenAI-compatible API (engine/serving/app_server.py) on the
model the app loaded, so nothing is loaded twice and the app's and the server's requests take
turns on the one engine. The API key lives in the system keychain, never in settings.json.
"""

from __future__ import annotations

import logging
import secrets

from app.bridge import EngineBridge
from app.qt import QObject, Qt, QtWidgets, Signal, Slot
from app.settings import SecretStoreError, SettingsError, SettingsStore, delete_secret, get_secret, set_secret
from engine.serving.protocol import ServerEvent
from engine.serving.loopback import is_loopback

log = logging.getLogger(__name__)

API_KEY_SECRET = "local_server_api_key"
SERVER_SETTINGS = ("local_server_enabled", "local_server_host", "local_server_port")
LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"
OTHER_HOST_WARNING = (
    "Other computers that can reach this one will be able to use the model. Set an API key, and only do this "
    "on a network you trust."
)


def server_status_text(event: ServerEvent | None, enabled: bool) -> str:
    """The tray's line about the local server: off, on at its address with the requests running, or why not."""
    if event is not None and event.running:
        count = event.active_requests
        running = "no requests running" if count == 0 else f"{count} request{'s' if count != 1 else ''} running"
        return f"Local server: on at {event.host}:{event.port} ({running})"
    if enabled and event is not None and event.error:
        return f"Local server: not running ({event.error[:80]})"
    if enabled:
        return "Local server: starting…"
    return "Local server: off"


class LocalServerController(QObject):
    """Keeps the engine's local server in line with the settings (and the keychain's API key)."""

    status_changed = Signal(str)  # the tray's line
    failed = Signal(str)

    def __init__(self, bridge: EngineBridge, settings: SettingsStore, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.bridge = bridge
        self.settings = settings
        settings.changed.connect(self._on_setting_changed)
        bridge.server_state.connect(self._on_server_state)

    def status_text(self) -> str:
        """The line the tray shows now."""
        return server_status_text(self.bridge.server, bool(self.settings.get("local_server_enabled")))

    def apply(self) -> None:
        """Ask the engine to serve as the settings say (or to stop)."""
        s = self.settings.settings
        key: str | None = None
        if s.local_server_enabled:
            try:
                key = get_secret(API_KEY_SECRET)
            except SecretStoreError as exc:
                self.failed.emit(f"The local server was not started: {exc}")
                return
        self.bridge.serve(s.local_server_enabled, s.local_server_host, s.local_server_port, key)
        self.status_changed.emit(self.status_text())

    @Slot(str)
    def _on_setting_changed(self, name: str) -> None:
        if name in SERVER_SETTINGS:
            self.apply()

    @Slot(object)
    def _on_server_state(self, event: ServerEvent) -> None:
        if event.error and self.settings.get("local_server_enabled"):
            self.failed.emit(f"The local server is not running: {event.error}")
        self.status_changed.emit(self.status_text())


class LocalServerPanel(QtWidgets.QWidget):
    """The Settings section: the switch, where it listens (this computer or, with a warning, others), port, key."""

    def __init__(self, settings: SettingsStore, controller: LocalServerController,
                 parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self.controller = controller
        s = settings.settings
        self.enabled = QtWidgets.QCheckBox("Serve the loaded model to other programs (OpenAI-compatible API)", self)
        self.enabled.setChecked(s.local_server_enabled)
        self.host = QtWidgets.QComboBox(self)
        self.host.addItem("This computer only (127.0.0.1)", LOOPBACK)
        self.host.addItem("Other computers too (all network addresses)", ALL_INTERFACES)
        if s.local_server_host not in (LOOPBACK, ALL_INTERFACES):
            self.host.addItem(s.local_server_host, s.local_server_host)
        self.host.setCurrentIndex(max(0, self.host.findData(s.local_server_host)))
        self.port = QtWidgets.QSpinBox(self)
        self.port.setRange(1, 65535)
        self.port.setValue(s.local_server_port)
        self.api_key = QtWidgets.QLineEdit(self)
        self.api_key.setEchoMode(QtWidgets.QLineEdit.EchoMode.PasswordEchoOnEdit)
        self.api_key.setPlaceholderText("none: any program on this computer may use it")
        try:
            self.api_key.setText(get_secret(API_KEY_SECRET) or "")
        except SecretStoreError as exc:
            self.api_key.setPlaceholderText(f"the keychain is not available ({exc})")
            self.api_key.setEnabled(False)
        self.generate = QtWidgets.QPushButton("New key", self)
        self.generate.clicked.connect(self._new_key)
        self.warning = QtWidgets.QLabel(OTHER_HOST_WARNING, self)
        self.warning.setWordWrap(True)
        self.warning.setObjectName("statusLabel")
        self.warning.setProperty("status", "error")
        self.status = QtWidgets.QLabel(controller.status_text(), self)
        self.status.setWordWrap(True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        controller.status_changed.connect(self.status.setText)
        self.host.currentIndexChanged.connect(self._update_warning)
        key_row = QtWidgets.QHBoxLayout()
        key_row.addWidget(self.api_key, 1)
        key_row.addWidget(self.generate)
        form = QtWidgets.QFormLayout(self)
        form.addRow("", self.enabled)
        form.addRow("Listen on:", self.host)
        form.addRow("", self.warning)
        form.addRow("Port:", self.port)
        form.addRow("API key:", key_row)
        form.addRow("", self.status)
        self._update_warning()

    def host_value(self) -> str:
        """The address chosen."""
        return str(self.host.currentData())

    def save(self) -> None:
        """Store the key in the keychain and the rest in the settings (the controller then applies them)."""
        key = self.api_key.text().strip()
        try:
            if self.api_key.isEnabled():
                if key:
                    set_secret(API_KEY_SECRET, key)
                else:
                    delete_secret(API_KEY_SECRET)
            values = {"local_server_enabled": self.enabled.isChecked(), "local_server_host": self.host_value(),
                      "local_server_port": self.port.value()}
            unchanged = all(self.settings.get(name) == value for name, value in values.items())
            self.settings.update(values)
        except (SecretStoreError, SettingsError) as exc:
            self.controller.failed.emit(f"The local server settings were not saved: {exc}")
            return
        if unchanged and self.enabled.isChecked():
            self.controller.apply()  # only the key changed: restart the server with it

    @Slot()
    def _new_key(self) -> None:
        self.api_key.setText(secrets.token_urlsafe(24))

    @Slot()
    def _update_warning(self) -> None:
        self.warning.setVisible(not is_loopback(self.host_value()))
