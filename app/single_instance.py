"""One MoeBar per profile: a second launch hands over to the running app (which shows its
window) and exits, instead of a second tray item, a second engine and a shared history file.

The first instance holds a lock file in the profile's data folder (QLockFile: a lock left by a
process that died is taken over) and listens on a local socket named after the profile. A later
launch that cannot take the lock connects to that socket, asks the running app to show itself
and exits.
"""

from __future__ import annotations

import hashlib
import logging
import time
from pathlib import Path

from app.qt import QObject, QtCore, QtNetwork, Signal, Slot

log = logging.getLogger(__name__)

SHOW_MESSAGE = b"show\n"
HANDOVER_WAIT_S = 5.0  # a first instance that is still starting gets this long to start listening


def server_name(profile_dir: Path) -> str:
    """The local socket name of the profile in `profile_dir` (short and the same for every launch)."""
    digest = hashlib.sha256(str(profile_dir.resolve()).encode("utf-8")).hexdigest()[:16]
    return f"moebar-{digest}"


class SingleInstance(QObject):
    """Claim the profile, or hand over to the instance that has it."""

    show_requested = Signal()  # another launch asked this instance to show its window

    def __init__(self, profile_dir: Path, parent: QObject | None = None) -> None:
        super().__init__(parent)
        profile_dir.mkdir(parents=True, exist_ok=True)
        self.name = server_name(profile_dir)
        self._lock = QtCore.QLockFile(str(profile_dir / "moebar.lock"))
        self._lock.setStaleLockTime(0)  # stale only when its process is gone, never by age
        self._server: QtNetwork.QLocalServer | None = None

    def claim(self) -> bool:
        """True if this process is now the profile's instance; False after handing over to the running one."""
        if self._lock.tryLock(100):
            self._listen()
            return True
        deadline = time.monotonic() + HANDOVER_WAIT_S
        while time.monotonic() < deadline:
            if self._hand_over():
                return False
            if self._lock.tryLock(100):  # the other one has just quit
                self._listen()
                return True
        log.warning("another MoeBar holds the profile lock but does not answer; not starting a second one")
        return False

    def release(self) -> None:
        """Stop listening and free the lock (on quit)."""
        if self._server is not None:
            self._server.close()
        self._server = None
        self._lock.unlock()

    def _listen(self) -> None:
        server = QtNetwork.QLocalServer(self)
        server.setSocketOptions(QtNetwork.QLocalServer.SocketOption.UserAccessOption)
        QtNetwork.QLocalServer.removeServer(self.name)  # a socket file left by a process that died
        if not server.listen(self.name):
            log.warning("cannot listen on %s: %s; a second launch will not find this one", self.name,
                        server.errorString())
        server.newConnection.connect(self._on_connection)
        self._server = server

    def _hand_over(self) -> bool:
        socket = QtNetwork.QLocalSocket()
        socket.connectToServer(self.name)
        if not socket.waitForConnected(500):
            return False
        socket.write(SHOW_MESSAGE)
        socket.flush()
        socket.waitForBytesWritten(1000)
        socket.disconnectFromServer()
        return True

    @Slot()
    def _on_connection(self) -> None:
        server = self._server
        if server is None:
            return
        while (socket := server.nextPendingConnection()) is not None:
            # The message is one short line: wait for it here rather than keep the socket around.
            if socket.bytesAvailable() or socket.waitForReadyRead(1000):
                if SHOW_MESSAGE.strip() in bytes(socket.readAll().data()):
                    self.show_requested.emit()
            socket.abort()
            socket.deleteLater()
