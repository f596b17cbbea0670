"""When to give the expert cache's memory back, and when to take it again.

On a Mac, memory another app needs is taken from the page cache first (dropped for free), but the
engine's expert cache is anonymous memory that macOS compresses or swaps (expert weights do not
compress), which makes the whole machine slower. So while the engine is idle, ``PressureWatcher``
reads ``platform_info.memory_pressure()`` every ``POLL_S`` and ``PressurePolicy`` decides:

- "critical": halve the cache at once, and again every ``CRITICAL_STEP_S`` while it lasts;
- "warning" lasting ``WARNING_HOLD_S``: halve it, and again every ``WARNING_HOLD_S`` it lasts;
- "normal" for ``NORMAL_HOLD_S`` after the last change: double it, one step at a time, back to the
  budget's size.

The cache never goes below the K working slots of each bank (``CacheResizer`` says when it is at
that floor). The policy is pure: the level and the clock are its inputs, so tests drive it with a
fake pressure source and a fake clock.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Literal

log = logging.getLogger(__name__)

Action = Literal["shrink", "grow"]

# The reading is one sysctl (macOS) or one small file (Linux PSI): microseconds. macOS re-rates
# its level within seconds of a change, and an app launching takes several seconds to push a Mac
# into swap, so a 2 s period reacts in time at no cost (the idle stats events use the same period).
POLL_S = 2.0
# After a shrink the kernel needs a few seconds to count the freed pages and lower its level; a
# second halving sooner would throw away a half that was enough. Five polls.
CRITICAL_STEP_S = 10.0
# "warning" comes and goes while an app launches or a large file is copied (page-cache churn,
# which the cache does not cause and cannot cure); only a warning lasting 30 s is a lasting deficit.
WARNING_HOLD_S = 30.0
# Growing takes memory another app may want again, and a shrink after a grow throws the cache away
# (it restarts cold): grow only after 5 min of calm, one doubling at a time (1/8 -> full: 15 min).
NORMAL_HOLD_S = 300.0


class PressurePolicy:
    """Turns memory-pressure readings over time into shrink / grow decisions (see the module)."""

    def __init__(
        self,
        *,
        critical_step_s: float = CRITICAL_STEP_S,
        warning_hold_s: float = WARNING_HOLD_S,
        normal_hold_s: float = NORMAL_HOLD_S,
    ) -> None:
        for name, value in (("critical_step_s", critical_step_s), ("warning_hold_s", warning_hold_s),
                            ("normal_hold_s", normal_hold_s)):  # fmt: skip
            if not value >= 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.critical_step_s = critical_step_s
        self.warning_hold_s = warning_hold_s
        self.normal_hold_s = normal_hold_s
        self.steps_down = 0  # shrinks not yet undone by a grow
        self.at_floor = False  # the last shrink found nothing to give back
        self._pressure_since: float | None = None  # start of the current run of warning/critical readings
        self._normal_since: float | None = None  # start of the current run of normal readings
        self._last_shrink: float | None = None
        self._last_change: float | None = None

    def observe(self, level: str, now: float) -> Action | None:
        """Take one reading (normal, warning, critical or unknown) at time ``now``; return what to do."""
        if level in ("warning", "critical"):
            self._normal_since = None
            if self._pressure_since is None:
                self._pressure_since = now
            if self.at_floor:
                return None
            if level == "critical":
                return "shrink" if self._since(self._last_shrink, now) >= self.critical_step_s else None
            lasted = now - self._pressure_since >= self.warning_hold_s
            return "shrink" if lasted and self._since(self._last_shrink, now) >= self.warning_hold_s else None
        if level != "normal":  # unknown: neither pressure nor calm
            self._normal_since = None
            return None
        self._pressure_since = None
        if self._normal_since is None:
            self._normal_since = now
        if self.steps_down == 0:
            return None
        calm = now - self._normal_since >= self.normal_hold_s
        return "grow" if calm and self._since(self._last_change, now) >= self.normal_hold_s else None

    def applied(self, action: Action, now: float, changed: bool) -> None:
        """Record the outcome of ``action``: ``changed`` False means the cache could not go further."""
        if action == "shrink":
            if changed:
                self.steps_down += 1
                self._last_shrink = self._last_change = now
            else:
                self.at_floor = True
        elif action == "grow":
            self.at_floor = False
            if changed:
                self.steps_down = max(0, self.steps_down - 1)
                self._last_change = now
            else:
                self.steps_down = 0
        else:
            raise ValueError(f"action must be 'shrink' or 'grow', got {action!r}")

    @staticmethod
    def _since(then: float | None, now: float) -> float:
        return float("inf") if then is None else now - then


class PressureWatcher:
    """A daemon thread that calls ``poll()`` every ``period_s`` until stopped."""

    def __init__(self, poll: Callable[[], object], period_s: float = POLL_S) -> None:
        if not period_s > 0:
            raise ValueError(f"period_s must be > 0, got {period_s}")
        self._poll = poll  # (its result is not used)
        self.period_s = period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moebar-memory-pressure", daemon=True)

    def start(self) -> "PressureWatcher":
        """Begin polling in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling. Does not wait: the engine thread calls it (on unload) while a poll may be
        waiting for that thread; such a poll's resize finds the engine gone and does nothing."""
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self._poll()
            except Exception:  # a failed reading or resize must not end the watch
                log.warning("memory-pressure check failed", exc_info=True)

