"""Drive a StdioServer in-process (queue-fed stdin, decoded stdout) or as a real subprocess."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.serving.protocol import Event, decode_event
from engine.serving.service import EngineService
from engine.serving.stdio_server import StdioServer

ROOT = Path(__file__).resolve().parents[2]


def line(obj: dict[str, Any]) -> str:
    """A request line (protocol version added when absent)."""
    return json.dumps({"v": 1, **obj}) + "\n"


class Events:
    """Collects decoded events; every line must decode, or the test fails."""

    def __init__(self) -> None:
        self.queue: queue.Queue[Event] = queue.Queue()
        self.seen: list[Event] = []
        self.bad_lines: list[str] = []
        self.hooks: list[Callable[[Event], None]] = []

    def add_line(self, text: str) -> None:
        try:
            ev = decode_event(text)
        except Exception:
            self.bad_lines.append(text)
            return
        for hook in self.hooks:
            hook(ev)
        self.queue.put(ev)

    def next(self, timeout: float = 60.0) -> Event:
        ev = self.queue.get(timeout=timeout)
        self.seen.append(ev)
        return ev

    def until(self, pred: Callable[[Event], bool], timeout: float = 120.0) -> list[Event]:
        """Events up to and including the first that matches pred."""
        deadline = time.monotonic() + timeout
        got = []
        while True:
            ev = self.next(max(0.01, deadline - time.monotonic()))
            got.append(ev)
            if pred(ev):
                return got


class _Stdout:
    def __init__(self, events: Events) -> None:
        self.events = events
        self.buf = ""

    def write(self, text: str) -> int:
        self.buf += text
        while "\n" in self.buf:
            one, self.buf = self.buf.split("\n", 1)
            self.events.add_line(one)
        return len(text)

    def flush(self) -> None:
        pass


class _Stdin:
    """Lines put on a queue; None ends the input. readline(limit) splits long lines like a file."""

    def __init__(self) -> None:
        self.lines: queue.Queue[str | None] = queue.Queue()
        self._rest = ""
        self._ended = False

    def readline(self, limit: int = -1) -> str:
        if not self._rest and not self._ended:
            item = self.lines.get()
            if item is None:
                self._ended = True
            else:
                self._rest = item
        cut = len(self._rest) if limit < 0 else min(limit, len(self._rest))
        out, self._rest = self._rest[:cut], self._rest[cut:]
        return out


class ManualTicks:
    """A stats clock that moves only when a test calls ``tick``: the ticker's waits return one
    interval per tick, and ``tick`` returns once the ticker has handled it (waits again)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._pending = 0
        self.waits = 0  # calls of the ticker's wait so far
        self.stopped = False

    def wait(self, interval: float) -> bool:
        with self._cond:
            self.waits += 1
            self._cond.notify_all()
            self._cond.wait_for(lambda: self._pending > 0 or self.stopped)
            if self.stopped:
                return True
            self._pending -= 1
            return False

    def started(self, timeout: float = 30.0) -> None:
        """Return once the ticker is waiting for its first tick."""
        with self._cond:
            assert self._cond.wait_for(lambda: self.waits > 0, timeout)

    def tick(self, n: int = 1, timeout: float = 30.0) -> None:
        """Let ``n`` intervals pass, one at a time; return when the ticker has handled each."""
        for _ in range(n):
            with self._cond:
                target = self.waits + 1
                self._pending += 1
                self._cond.notify_all()
                assert self._cond.wait_for(lambda: self.waits >= target, timeout), "the ticker did not come back"

    def stop(self) -> None:
        with self._cond:
            self.stopped = True
            self._cond.notify_all()


class InProcess:
    """A StdioServer on a thread: send() lines, read events. With ``ticks`` the stats ticker runs
    on that manual clock instead of the wall clock."""

    def __init__(
        self,
        service: EngineService,
        stats_interval: float = 0.5,
        *,
        idle_stats_interval: float = 0,
        ticks: ManualTicks | None = None,
    ) -> None:
        self.events = Events()
        self.stdin = _Stdin()
        self.ticks = ticks
        self.server = StdioServer(service, self.stdin, _Stdout(self.events), stats_interval, idle_stats_interval)  # type: ignore[arg-type]
        if ticks is not None:
            self.server.wait_tick = ticks.wait
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()

    def send(self, obj: dict[str, Any] | str) -> None:
        self.stdin.lines.put(obj if isinstance(obj, str) else line(obj))

    def close(self) -> None:
        if self.ticks is not None:
            self.ticks.stop()  # the ticker ends (it would on run()'s stop flag with a real clock)
        self.stdin.lines.put(None)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


class Subprocess:
    """`python -m engine.serving.stdio_server` with pipes; a thread decodes stdout."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ if env is None else env, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "engine.serving.stdio_server", "--idle-stats-interval", "0", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            cwd=str(ROOT),
            env=env,
        )
        self.events = Events()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.events.add_line(text)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for text in self.proc.stderr:
            self.stderr.append(text)

    def send(self, obj: dict[str, Any] | str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(obj if isinstance(obj, str) else line(obj))
        self.proc.stdin.flush()

    def close(self, timeout: float = 60) -> int:
        try:
            self.send({"type": "shutdown"})
        except (BrokenPipeError, OSError):
            pass
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
