"""Background operations: run a function on a worker thread, get its result back on the GUI thread.

    BackgroundOp(window, lambda ctx: parse(path), on_success=show, on_failure=report) \\
        .with_progress(progress_bar.update).run()

Results, failures and progress reach the callbacks through queued signals into a QObject that
lives in the GUI thread (connecting a worker signal to a plain lambda would run it on the
worker). If `parent` is destroyed before the op ends, no callback runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from app.qt import QCoreApplication, QObject, QRunnable, Qt, QThreadPool, Signal, Slot, is_alive

log = logging.getLogger(__name__)

T = TypeVar("T")

_PROGRESS_INTERVAL_S = 0.05


@dataclass(frozen=True)
class Progress:
    """One progress report: `done` of `total` units (total None when unknown) and a label."""

    done: int
    total: int | None
    label: str = ""


class OpContext:
    """Handed to the op on the worker thread: report progress, check for cancellation."""

    def __init__(self, emit_progress: Callable[[Progress], None], cancel_event: threading.Event) -> None:
        self._emit_progress = emit_progress
        self._cancel_event = cancel_event
        self._last_report = 0.0

    @property
    def cancelled(self) -> bool:
        """True once `BackgroundOp.cancel()` was called; long ops should check it and return."""
        return self._cancel_event.is_set()

    def report(self, done: int, total: int | None = None, label: str = "") -> None:
        """Send progress to the GUI; reports closer than 50 ms apart are dropped except the last unit."""
        now = time.monotonic()
        if total is not None and done >= total or now - self._last_report >= _PROGRESS_INTERVAL_S:
            self._last_report = now
            self._emit_progress(Progress(done, total, label))


class _Relay(QObject):
    """Lives in the GUI thread; its slots run the user callbacks there."""

    succeeded = Signal(object)
    failed = Signal(object)
    progressed = Signal(object)

    def __init__(self, op: BackgroundOp[object]) -> None:
        super().__init__()
        self._op: BackgroundOp[object] | None = op
        self.succeeded.connect(self._deliver_success, Qt.ConnectionType.QueuedConnection)
        self.failed.connect(self._deliver_failure, Qt.ConnectionType.QueuedConnection)
        self.progressed.connect(self._deliver_progress, Qt.ConnectionType.QueuedConnection)

    def _finish(self) -> BackgroundOp[object] | None:
        op, self._op = self._op, None
        _running.discard(self)
        if op is None or op.cancelled or op.parent_destroyed:
            return None
        return op

    @Slot(object)
    def _deliver_success(self, result: object) -> None:
        op = self._finish()
        if op is not None:
            op.on_success(result)

    @Slot(object)
    def _deliver_failure(self, error: object) -> None:
        op = self._finish()
        if op is not None:
            assert isinstance(error, BaseException)
            op.on_failure(error)

    @Slot(object)
    def _deliver_progress(self, progress: object) -> None:
        op = self._op
        if op is not None and op.progress_callback is not None and not op.cancelled and not op.parent_destroyed:
            assert isinstance(progress, Progress)
            op.progress_callback(progress)


class _Worker(QRunnable):
    def __init__(self, work: Callable[[], None]) -> None:
        super().__init__()
        self._work = work

    def run(self) -> None:
        self._work()


# Relays of ops still running: keeps them alive until the result has been delivered.
_running: set[_Relay] = set()


def _log_failure(error: BaseException) -> None:
    log.error("background operation failed", exc_info=(type(error), error, error.__traceback__))


class BackgroundOp(Generic[T]):
    """One unit of background work (Anki's QueryOp): `op(ctx)` on a pool thread, callbacks on the GUI thread."""

    def __init__(self, parent: QObject | None, op: Callable[[OpContext], T],
                 on_success: Callable[[T], None],
                 on_failure: Callable[[BaseException], None] | None = None) -> None:
        self.parent = parent
        self.op = op
        self.on_success = on_success
        self.on_failure = on_failure if on_failure is not None else _log_failure
        self.progress_callback: Callable[[Progress], None] | None = None
        self._cancel_event = threading.Event()
        self._started = False

    @property
    def parent_destroyed(self) -> bool:
        """True if `parent` was given and Qt has deleted it since (callbacks are then skipped)."""
        return self.parent is not None and not is_alive(self.parent)

    @property
    def cancelled(self) -> bool:
        """True once `cancel()` was called."""
        return self._cancel_event.is_set()

    def with_progress(self, callback: Callable[[Progress], None]) -> BackgroundOp[T]:
        """Call `callback(Progress)` on the GUI thread whenever the op reports progress."""
        self.progress_callback = callback
        return self

    def cancel(self) -> None:
        """Ask the op to stop (it sees `ctx.cancelled`); no callback runs after this."""
        self._cancel_event.set()

    def run(self, pool: QThreadPool | None = None) -> BackgroundOp[T]:
        """Start the op on `pool` (the global pool by default); must be called on the GUI thread."""
        if self._started:
            raise RuntimeError("This BackgroundOp was already started; create a new one for each run.")
        app = QCoreApplication.instance()
        if app is None:
            raise RuntimeError("BackgroundOp needs a running QApplication to deliver results.")
        self._started = True
        relay = _Relay(self)  # type: ignore[arg-type]
        relay.moveToThread(app.thread())
        _running.add(relay)
        context = OpContext(relay.progressed.emit, self._cancel_event)

        def work() -> None:
            try:
                result = self.op(context)
            except BaseException as error:  # noqa: BLE001 - every failure goes to on_failure
                relay.failed.emit(error)
            else:
                relay.succeeded.emit(result)

        (pool if pool is not None else QThreadPool.globalInstance()).start(_Worker(work))
        return self
