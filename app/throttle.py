"""Coalesce bursts of calls (tokens, gauge updates) into at most one call per interval."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from app.qt import QObject, QTimer


class Throttle(QObject):
    """Call `func` at most once every `interval_ms`, always with the latest arguments.

    The first call after a quiet period runs at once; calls inside the interval are merged
    and the last of them runs when the interval ends, so the final state is never lost.
    """

    def __init__(self, func: Callable[..., Any], interval_ms: int, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._func = func
        self._interval_ms = interval_ms
        self._pending: tuple[tuple[Any, ...], dict[str, Any]] | None = None
        self._last_call: float | None = None
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.timeout.connect(self._on_timeout)

    @property
    def interval_ms(self) -> int:
        """The minimum time between two calls of the wrapped function."""
        return self._interval_ms

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        """Request a call; it runs now or at the end of the current interval."""
        if self._timer.isActive():
            self._pending = (args, kwargs)
            return
        now = time.monotonic()
        since_ms = None if self._last_call is None else (now - self._last_call) * 1000.0
        if since_ms is None or since_ms >= self._interval_ms:
            self._run(args, kwargs)
            return
        self._pending = (args, kwargs)
        self._timer.start(max(1, int(self._interval_ms - since_ms)))

    def has_pending(self) -> bool:
        """Whether a merged call is waiting for the interval to end."""
        return self._pending is not None

    def flush(self) -> None:
        """Run the waiting call now (for example when a stream ends)."""
        self._timer.stop()
        if self._pending is not None:
            args, kwargs = self._pending
            self._run(args, kwargs)

    def cancel(self) -> None:
        """Drop the waiting call, if any."""
        self._timer.stop()
        self._pending = None

    def _on_timeout(self) -> None:
        if self._pending is not None:
            args, kwargs = self._pending
            self._run(args, kwargs)

    def _run(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._pending = None
        self._last_call = time.monotonic()
        self._func(*args, **kwargs)
