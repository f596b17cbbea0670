"""`moebar-engine stdio`: the JSON-lines loop the app runs (requests on stdin, events on stdout).

The reader (main thread) decodes lines and answers bad ones with error events; a worker thread
runs load, chat and unload in order; cancel is handled by the reader at once, so a running
generation stops at its next token. A ticker emits stats twice a second while the engine works.
Only protocol lines go to stdout; logs and stray prints go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from collections.abc import Callable, Iterator
from typing import Any, TextIO

from engine.serving.protocol import (
    MAX_LINE_CHARS,
    CancelRequest,
    ChatRequest,
    DoneEvent,
    ErrorEvent,
    Event,
    HelloEvent,
    LoadRequest,
    ProtocolError,
    Request,
    ServeRequest,
    ShutdownRequest,
    StatsEvent,
    UnloadedEvent,
    UnloadRequest,
    decode_request,
    encode,
    peek_id,
)
from engine.serving.app_server import LocalApiServer
from engine.serving.service import EngineService, error_event

log = logging.getLogger("moebar.stdio")


class EventWriter:
    """Writes events as lines, one writer at a time; stops quietly when the reader is gone."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        self.closed = False

    def __call__(self, event: Event) -> None:
        """Write one event line and flush it."""
        try:
            line = encode(event)
        except ProtocolError as exc:  # report what could not be sent rather than go silent
            log.error("%s", exc)
            line = encode(ErrorEvent(code="internal_error", message=str(exc), usable=True, id=getattr(event, "id", None)))
        with self._lock:
            if self.closed:
                return
            try:
                self._stream.write(line)
                self._stream.flush()
            except (BrokenPipeError, ValueError, OSError):
                self.closed = True  # the app went away; the reader sees EOF next


@dataclass
class _Job:
    request: Request
    cancel: threading.Event = field(default_factory=threading.Event)


class StdioServer:
    """The protocol loop around one EngineService."""

    def __init__(
        self,
        service: EngineService,
        stdin: TextIO,
        stdout: TextIO,
        stats_interval: float = 0.5,
        idle_stats_interval: float = 2.0,
    ) -> None:
        self.service = service
        self.stdin = stdin
        self.emit = EventWriter(stdout)
        service.notify = self.emit  # notices that come while idle (memory pressure resized the cache)
        self.stats_interval = stats_interval
        self.idle_stats_interval = idle_stats_interval
        self._jobs: queue.Queue[_Job | None] = queue.Queue()
        self._chats: dict[str, _Job] = {}  # chat requests queued or running, by id
        self._chats_lock = threading.Lock()
        self._stopping = threading.Event()
        # How the stats ticker waits one interval: True means stop. Tests replace it with a
        # manual clock (before run), so that they count events per tick instead of per second.
        self.wait_tick: Callable[[float], bool] = self._stopping.wait
        self.local_api = LocalApiServer(service, self.emit)  # the app's local server, on request

    def run(self) -> int:
        """Serve until shutdown or end of input; return the exit status."""
        self.emit(HelloEvent(pid=os.getpid()))
        worker = threading.Thread(target=self._work, name="moebar-engine-worker", daemon=True)
        ticker = threading.Thread(target=self._tick, name="moebar-engine-stats", daemon=True)
        worker.start()
        ticker.start()
        try:
            for line in self._lines():
                if line is None:
                    self.emit(ErrorEvent(code="bad_request", message=f"line longer than {MAX_LINE_CHARS} characters", usable=True))
                    continue
                if not line.strip():
                    continue
                if not self._handle_line(line):
                    break
        finally:
            self._stopping.set()
            with self._chats_lock:
                for job in self._chats.values():
                    job.cancel.set()
            self._jobs.put(None)
            worker.join()
            ticker.join(timeout=5)
            self.local_api.close()
            self.service.close()
        return 0

    def _lines(self) -> Iterator[str | None]:
        """Input lines; None stands for a line over MAX_LINE_CHARS, which is read and dropped."""
        while True:
            line = self.stdin.readline(MAX_LINE_CHARS + 1)
            if not line:
                return
            if len(line) > MAX_LINE_CHARS:
                while line and not line.endswith("\n"):  # drop the rest without holding it
                    line = self.stdin.readline(MAX_LINE_CHARS)
                yield None
                continue
            yield line

    def _handle_line(self, line: str) -> bool:
        """Act on one input line; False means stop reading."""
        try:
            request = decode_request(line)
        except ProtocolError as exc:
            self.emit(ErrorEvent(code=exc.code, message=str(exc), usable=True, id=peek_id(line), field=exc.field))
            return True
        if isinstance(request, ShutdownRequest):
            return False
        if isinstance(request, ServeRequest):
            # Off the reader: stopping waits for running HTTP requests, and cancel must stay instant.
            threading.Thread(target=self.local_api.apply, args=(request,), name="moebar-serve", daemon=True).start()
            return True
        if isinstance(request, CancelRequest):
            with self._chats_lock:
                job = self._chats.get(request.id)
            if job is not None:
                job.cancel.set()
            else:
                log.info("cancel: no request %r is queued or running", request.id)
            return True
        job = _Job(request)
        if isinstance(request, ChatRequest):
            with self._chats_lock:
                if request.id in self._chats:
                    self.emit(ErrorEvent(code="duplicate_id", message=f"chat.id {request.id!r} is already in use", usable=True, id=request.id, field="chat.id"))
                    return True
                self._chats[request.id] = job
        self._jobs.put(job)
        return True

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._run_job(job)
            except Exception as exc:  # never let the worker die: report and serve the next request
                log.exception("request failed")
                self.emit(error_event(exc, getattr(job.request, "id", None)))
            finally:
                if isinstance(job.request, ChatRequest):
                    with self._chats_lock:
                        self._chats.pop(job.request.id, None)

    def _run_job(self, job: _Job) -> None:
        req = job.request
        if isinstance(req, LoadRequest):
            self.emit(self.service.load(req, self.emit))
        elif isinstance(req, UnloadRequest):
            self.service.unload()
            self.emit(UnloadedEvent())
        elif isinstance(req, ChatRequest):
            if job.cancel.is_set():
                self.emit(DoneEvent(id=req.id, finish_reason="cancelled"))
                return
            try:
                done = self.service.chat(req, self.emit, job.cancel.is_set)
            except Exception as exc:
                log.debug("chat %s failed", req.id, exc_info=True)
                self.emit(error_event(exc, req.id))
                self.emit(DoneEvent(id=req.id, finish_reason="error"))
                return
            self.emit(done)

    def _stats_event(self) -> StatsEvent:
        request_id, figures = self.service.live_figures()
        return StatsEvent(figures=figures, id=request_id)

    def _tick(self) -> None:
        waited = 0.0
        while not self.wait_tick(self.stats_interval):
            waited += self.stats_interval
            busy = self.service.busy
            if busy or (self.idle_stats_interval > 0 and waited >= self.idle_stats_interval):
                waited = 0.0
                try:
                    self.emit(self._stats_event())
                except Exception:  # a reader racing with unload; the next tick retries
                    log.debug("stats sample failed", exc_info=True)


def _protocol_stdout() -> TextIO:
    """Keep the real stdout for protocol lines and send everything else written to fd 1 to stderr."""
    protocol_fd = os.dup(sys.stdout.fileno())
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return os.fdopen(protocol_fd, "w", encoding="utf-8", buffering=1, newline="\n")


def add_stdio_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options of `moebar-engine stdio` to a parser."""
    parser.add_argument("--stats-interval", type=float, default=0.5, help="seconds between stats events while working")
    parser.add_argument("--idle-stats-interval", type=float, default=2.0, help="seconds between stats events when idle (0: none)")
    parser.add_argument("--log-level", default="INFO", help="stderr log level (DEBUG, INFO, WARNING)")


def run_stdio(args: Any = None) -> int:
    """Run the stdio protocol loop on this process's stdin/stdout (args from add_stdio_arguments)."""
    stats_interval = float(getattr(args, "stats_interval", 0.5))
    idle_interval = float(getattr(args, "idle_stats_interval", 2.0))
    logging.basicConfig(
        level=str(getattr(args, "log_level", "INFO")).upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    if stats_interval <= 0:
        raise SystemExit("--stats-interval must be > 0")
    from engine.serving.replicated import service_for_this_rank

    service, follower = service_for_this_rank()
    if follower is not None:  # another machine's rank: replay rank 0's requests, no protocol here
        return follower()
    stdout = _protocol_stdout()
    stdin = open(sys.stdin.fileno(), encoding="utf-8", errors="replace", closefd=False)  # bad bytes become U+FFFD
    server = StdioServer(service, stdin, stdout, stats_interval, idle_interval)
    return server.run()


def build_parser() -> argparse.ArgumentParser:
    """Arguments of `moebar-engine stdio`."""
    parser = argparse.ArgumentParser(prog="moebar-engine stdio", description=__doc__.splitlines()[0])
    add_stdio_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `moebar-engine stdio` and `python -m engine.serving.stdio_server`."""
    return run_stdio(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
