"""EngineBridge: the only thing that talks to the engine process.

A worker QObject living in its own QThread owns the `QProcess` (qutebrowser's guiprocess
pattern): it writes requests as JSON lines, reads events and re-emits each as a typed signal.
`EngineBridge`, living in the GUI thread, relays those signals, so every slot or lambda
connected to it runs in the GUI thread and the UI never waits on the pipe.

When the engine exits unexpectedly (a crash, SIGKILL, out of memory) the bridge says why,
reports the requests that were lost, starts a new engine and reloads the last model.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from app.frozen import engine_command
from app.qt import QObject, Qt, QThread, QTimer, QtCore, Signal, Slot
from app.several_macs import EXIT_PEER_LOST, PEER_LOST
from engine.serving import protocol
from engine.serving.protocol import (
    CancelRequest,
    ChatRequest,
    DoneEvent,
    ErrorEvent,
    HelloEvent,
    LoadedEvent,
    LoadRequest,
    NoticeEvent,
    PrefillEvent,
    ProgressEvent,
    ServeRequest,
    ServerEvent,
    ShutdownRequest,
    StatsEvent,
    TokenTextEvent,
    ToolCallEvent,
    UnloadedEvent,
    UnloadRequest,
)
from engine.types import EngineOptions

log = logging.getLogger(__name__)

DEFAULT_ENGINE_COMMAND: tuple[str, ...] = tuple(engine_command())  # `MoeBar --engine-stdio` in a bundle
ENGINE_COMMAND_ENV = "MOEBAR_ENGINE_COMMAND"
STDERR_TAIL_LINES = 40
RESTART_DELAYS_S = (0.2, 1.0, 3.0)  # back-off for successive crashes inside CRASH_WINDOW_S
CRASH_WINDOW_S = 60.0
MAX_CRASHES_IN_WINDOW = 3  # more than this and the bridge stops restarting until asked
SHUTDOWN_GRACE_S = 3.0

# Engine states, as `state_changed` reports them.
STOPPED, STARTING, IDLE, LOADING, READY, BUSY, RESTARTING, FAILED = (
    "stopped", "starting", "idle", "loading", "ready", "busy", "restarting", "failed",
)


def describe_exit(exit_code: int, crashed: bool, stderr_tail: Sequence[str], engine_message: str = "") -> str:
    """A sentence saying why the engine process ended, for the user."""
    tail = "\n".join(stderr_tail[-STDERR_TAIL_LINES:])
    if engine_message:
        return f"The engine stopped: {engine_message}"
    if crashed:
        try:
            name = signal.Signals(exit_code).name
        except ValueError:
            name = f"signal {exit_code}"
        if exit_code == signal.SIGKILL:
            return (
                f"The engine was killed ({name}). The system may have run out of memory; "
                "a smaller expert cache or a smaller model helps."
            )
        return f"The engine crashed ({name})."
    if "MemoryError" in tail or "out of memory" in tail.lower():
        return f"The engine ran out of memory (exit code {exit_code}). A smaller expert cache helps."
    last = next((line for line in reversed(stderr_tail) if line.strip()), "")
    detail = f": {last.strip()}" if last else ""
    return f"The engine exited unexpectedly (exit code {exit_code}){detail}"


def engine_command_from_env() -> list[str]:
    """The engine command: $MOEBAR_ENGINE_COMMAND split like a shell would, or the default."""
    import shlex

    value = os.environ.get(ENGINE_COMMAND_ENV, "").strip()
    return shlex.split(value) if value else list(DEFAULT_ENGINE_COMMAND)


class EngineProcessWorker(QObject):
    """Owns the engine QProcess inside the bridge's thread; never touched from the GUI thread."""

    hello = Signal(int)
    loaded = Signal(object)  # LoadedEvent
    progress = Signal(str, float)
    token = Signal(str, str, str)  # request id, text, kind ("answer" or "reasoning")
    prefill = Signal(object)  # PrefillEvent: the prompt is being read
    tool_call = Signal(object)  # ToolCallEvent
    stats = Signal(object)  # StatsEvent
    done = Signal(object)  # DoneEvent
    error = Signal(object)  # ErrorEvent
    unloaded = Signal()
    state_changed = Signal(str)
    engine_lost = Signal(str, object)  # reason, ids of chat requests that were cut off
    restarting = Signal(int, str)  # attempt, reason
    gave_up = Signal(str)
    protocol_error = Signal(str)
    server_state = Signal(object)  # ServerEvent: the local HTTP server's state
    peer_lost = Signal(str)  # another machine's rank stopped answering: the engine's own words
    notice = Signal(object)  # NoticeEvent: e.g. memory pressure resized the expert cache
    stopped = Signal()

    def __init__(self, command: Sequence[str], log_path: Path | None) -> None:
        super().__init__()
        self._command = list(command)
        self._environment: dict[str, str] = {}  # added to the engine's environment (e.g. MLX_RANK)
        # Rewords an error for people (set from the GUI thread before use; called in this thread).
        self.error_wording: Callable[[ErrorEvent], str] | None = None
        self._log_path = log_path
        self._process: QtCore.QProcess | None = None
        self._buffer = bytearray()
        self._stderr_buffer = bytearray()
        self._stderr_tail: deque[str] = deque(maxlen=STDERR_TAIL_LINES)
        self._in_flight: list[str] = []
        self._model_request: LoadRequest | None = None
        self._serve_request: ServeRequest | None = None  # sent again to a restarted engine
        self._loads_pending = 0  # load requests sent to this process and not yet answered
        self._stopping = False
        self._fatal_message = ""
        self._crash_times: deque[float] = deque()
        self._state = STOPPED

    # ------------------------------------------------------------ slots (run in the thread)

    @Slot()
    def start(self) -> None:
        """Start the engine process (if it is not running)."""
        if self._process is not None:
            return
        self._stopping = False
        self._fatal_message = ""
        self._loads_pending = 0
        self._buffer.clear()
        self._stderr_buffer.clear()
        self._stderr_tail.clear()
        process = QtCore.QProcess(self)
        env = QtCore.QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        for name, value in self._environment.items():
            env.insert(name, value)
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(self._read_stdout)
        process.readyReadStandardError.connect(self._read_stderr)
        process.finished.connect(self._on_finished)
        process.errorOccurred.connect(self._on_process_error)
        self._process = process
        self._set_state(STARTING)
        log.info("starting engine: %s", " ".join(self._command))
        process.start(self._command[0], self._command[1:])
        if self._model_request is not None:
            self._write(self._model_request)
            self._loads_pending = 1  # a fresh process: only this load is pending
            self._set_state(LOADING)
        if self._serve_request is not None and self._serve_request.enabled:
            self._write(self._serve_request)

    @Slot(object)
    def serve(self, request: ServeRequest) -> None:
        """Start or stop the engine's local HTTP server (remembered across engine restarts)."""
        self._serve_request = request
        if self._process is not None:
            self._write(request)

    @Slot(object)
    def load(self, request: LoadRequest) -> None:
        """Load a model (remembered, so that a restarted engine loads it again)."""
        self._model_request = request
        if self._process is None:
            self.start()  # start() sends the remembered load request
            return
        self._loads_pending += 1
        self._write(request)
        self._set_state(LOADING)

    @Slot(object)
    def chat(self, request: ChatRequest) -> None:
        """Send a chat request, or answer with an error when no engine can take it."""
        if self._process is None or self._state in (RESTARTING, FAILED, STOPPED):
            self.error.emit(ErrorEvent(code="engine_unavailable", id=request.id, usable=True,
                                       message="The engine is not running; wait for it to restart."))
            self.done.emit(DoneEvent(id=request.id, finish_reason="error"))
            return
        self._in_flight.append(request.id)
        self._write(request)
        self._set_state(BUSY)

    @Slot(str)
    def cancel(self, request_id: str) -> None:
        """Ask the engine to stop a chat request."""
        if request_id in self._in_flight and self._process is not None:
            self._write(CancelRequest(id=request_id))

    @Slot()
    def unload(self) -> None:
        """Free the model; a restart will not reload it."""
        self._model_request = None
        if self._process is not None:
            self._write(UnloadRequest())

    @Slot()
    def restart(self) -> None:
        """Start again after giving up (the user asked); reloads the last model."""
        self._crash_times.clear()
        if self._process is None:
            self.start()

    @Slot()
    def kill_for_test(self) -> None:
        """Send SIGKILL to the engine (used by tests and the 'simulate crash' developer action)."""
        pid = self._process.processId() if self._process is not None else 0
        if pid:
            os.kill(pid, signal.SIGKILL)

    @Slot(object)
    def relaunch(self, environment: dict[str, str]) -> None:
        """Give the engine `environment` from now on: a running engine is stopped and started again with it.

        The model is loaded again; answers cut off by the restart are reported through `engine_lost`.
        """
        self._environment = dict(environment)
        if self._process is None:
            if self._state == FAILED:
                self.restart()
            return  # a stopped engine, or one about to restart, starts with the new environment
        lost, self._in_flight = self._in_flight, []
        self._stop_process()
        if lost:
            self.engine_lost.emit("The engine was restarted with the new Several Macs settings.", lost)
        self.start()

    @Slot()
    def shutdown(self) -> None:
        """Stop the engine: ask politely, wait a little, then kill. Emits `stopped`."""
        self._stop_process()
        self._set_state(STOPPED)
        self.stopped.emit()

    def _stop_process(self) -> None:
        self._stopping = True
        process = self._process
        if process is not None:
            self._write(ShutdownRequest())
            process.closeWriteChannel()
            if not process.waitForFinished(int(SHUTDOWN_GRACE_S * 1000)):
                process.kill()
                process.waitForFinished(2000)
        self._process = None

    # ------------------------------------------------------------ process I/O

    def _write(self, request: protocol.Request) -> None:
        assert self._process is not None
        self._process.write(protocol.encode(request).encode("utf-8"))

    @Slot()
    def _read_stdout(self) -> None:
        process = self._process
        if process is None:
            return
        self._buffer += bytes(process.readAllStandardOutput().data())
        while True:
            newline = self._buffer.find(b"\n")
            if newline < 0:
                break
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            if line.strip():
                self._dispatch(line)

    @Slot()
    def _read_stderr(self) -> None:
        process = self._process
        if process is None:
            return
        chunk = bytes(process.readAllStandardError().data())
        self._append_log(chunk)
        self._stderr_buffer += chunk
        *lines, rest = self._stderr_buffer.split(b"\n")
        self._stderr_buffer = bytearray(rest)
        for line in lines:
            self._stderr_tail.append(line.decode("utf-8", "replace"))

    def _append_log(self, chunk: bytes) -> None:
        if self._log_path is None:
            return
        try:
            self._log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self._log_path, "ab") as handle:
                handle.write(chunk)
        except OSError:
            log.warning("could not write the engine log %s", self._log_path)

    def _dispatch(self, line: bytes) -> None:
        try:
            event = protocol.decode_event(line)
        except protocol.ProtocolError as exc:
            log.warning("bad line from the engine: %s (%r)", exc, line[:200])
            self.protocol_error.emit(str(exc))
            return
        if isinstance(event, TokenTextEvent):
            self.token.emit(event.id, event.text, event.kind)
        elif isinstance(event, StatsEvent):
            self.stats.emit(event)
        elif isinstance(event, PrefillEvent):
            self.prefill.emit(event)
        elif isinstance(event, ToolCallEvent):
            self.tool_call.emit(event)
        elif isinstance(event, DoneEvent):
            if event.id in self._in_flight:
                self._in_flight.remove(event.id)
            if not self._in_flight and self._state == BUSY:
                self._set_state(READY)  # before `done`, so a done handler sees the new state
            self.done.emit(event)
        elif isinstance(event, LoadedEvent):
            self._loads_pending = max(0, self._loads_pending - 1)
            self._crash_times.clear()  # a successful load ends a crash streak
            self.loaded.emit(event)  # before READY, so whoever sees READY also finds the model
            # A later load still pending replaces this model: stay LOADING until it answers.
            self._set_state(LOADING if self._loads_pending else BUSY if self._in_flight else READY)
        elif isinstance(event, ProgressEvent):
            self.progress.emit(event.stage, event.fraction)
        elif isinstance(event, ErrorEvent):
            self._on_error_event(event)
        elif isinstance(event, HelloEvent):
            self.hello.emit(event.pid)
            if self._state == STARTING:
                self._set_state(IDLE)
        elif isinstance(event, UnloadedEvent):
            self.unloaded.emit()
            self._set_state(IDLE)
        elif isinstance(event, ServerEvent):
            self.server_state.emit(event)
        elif isinstance(event, NoticeEvent):
            self.notice.emit(event)

    def _on_error_event(self, event: ErrorEvent) -> None:
        if event.code == PEER_LOST:
            self.peer_lost.emit(event.message)
        if self.error_wording is not None:
            event = replace(event, message=self.error_wording(event))
        if event.id is None and self._loads_pending:
            # A load failed; the engine dropped the model it had. If it was the last load sent,
            # that model cannot be loaded: say so and do not load it again after a restart.
            self._loads_pending -= 1
            if not self._loads_pending:
                self._model_request = None
                self._set_state(IDLE)
        self.error.emit(event)
        if not event.usable and self._process is not None:
            # The engine says it cannot go on (e.g. out of memory): replace it.
            self._fatal_message = event.message
            self._process.kill()

    @Slot(QtCore.QProcess.ProcessError)
    def _on_process_error(self, error: QtCore.QProcess.ProcessError) -> None:
        if error != QtCore.QProcess.ProcessError.FailedToStart:
            return  # crashes arrive through finished()
        process = self._process
        detail = process.errorString() if process is not None else ""
        self._process = None
        reason = f"The engine could not be started ({' '.join(self._command)}): {detail}"
        self._fail(reason)

    @Slot(int, QtCore.QProcess.ExitStatus)
    def _on_finished(self, exit_code: int, status: QtCore.QProcess.ExitStatus) -> None:
        process = self._process
        if process is not None:
            self._read_stdout()  # events written just before the end still count
            self._read_stderr()
            process.deleteLater()
        self._process = None
        if self._stopping:
            return
        crashed = status == QtCore.QProcess.ExitStatus.CrashExit
        reason = describe_exit(exit_code, crashed, list(self._stderr_tail), self._fatal_message)
        if not crashed and exit_code == EXIT_PEER_LOST and not self._fatal_message:
            # a collective's watchdog ended the engine: another machine's rank never answered
            said = next((line.strip() for line in reversed(self._stderr_tail) if line.strip()), reason)
            self.peer_lost.emit(said)
            if self.error_wording is not None:
                reason = self.error_wording(ErrorEvent(code=PEER_LOST, message=said, usable=False))
        log.warning("%s", reason)
        lost, self._in_flight = self._in_flight, []
        if self._serve_request is not None and self._serve_request.enabled:
            self.server_state.emit(ServerEvent(running=False, error="the engine stopped; it restarts with the server"))
        self.engine_lost.emit(reason, lost)
        now = time.monotonic()
        self._crash_times.append(now)
        while self._crash_times and now - self._crash_times[0] > CRASH_WINDOW_S:
            self._crash_times.popleft()
        if len(self._crash_times) > MAX_CRASHES_IN_WINDOW:
            self._fail(f"{reason} It stopped {len(self._crash_times)} times in a minute, so it was not restarted.")
            return
        attempt = len(self._crash_times)
        self._set_state(RESTARTING)
        self.restarting.emit(attempt, reason)
        delay = RESTART_DELAYS_S[min(attempt, len(RESTART_DELAYS_S)) - 1]
        QTimer.singleShot(int(delay * 1000), self._restart_after_crash)

    @Slot()
    def _restart_after_crash(self) -> None:
        if not self._stopping and self._state == RESTARTING:
            self.start()

    def _fail(self, reason: str) -> None:
        self._set_state(FAILED)
        self.gave_up.emit(reason)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.state_changed.emit(state)


class EngineBridge(QObject):
    """The app's handle on the engine: call its methods, connect to its signals (GUI thread)."""

    hello = Signal(int)  # engine pid
    loaded = Signal(object)  # LoadedEvent
    progress = Signal(str, float)  # stage, fraction
    token = Signal(str, str, str)  # request id, text, kind
    prefill = Signal(object)  # PrefillEvent: progress of a request's prompt prefill
    tool_call = Signal(object)  # ToolCallEvent
    stats = Signal(object)  # StatsEvent
    done = Signal(object)  # DoneEvent
    error = Signal(object)  # ErrorEvent
    unloaded = Signal()
    state_changed = Signal(str)
    engine_lost = Signal(str, object)  # reason, ids of requests cut off
    restarting = Signal(int, str)  # attempt, reason
    gave_up = Signal(str)  # reason; call restart() to try again
    protocol_error = Signal(str)
    server_state = Signal(object)  # ServerEvent: the local HTTP server (on/off, address, requests running)
    peer_lost = Signal(str)  # another machine's rank stopped answering (the engine's words)
    notice = Signal(object)  # NoticeEvent: something to tell the user that is not an error

    _start_requested = Signal()
    _serve_requested = Signal(object)
    _load_requested = Signal(object)
    _chat_requested = Signal(object)
    _cancel_requested = Signal(str)
    _unload_requested = Signal()
    _restart_requested = Signal()
    _kill_requested = Signal()
    _shutdown_requested = Signal()
    _relaunch_requested = Signal(object)

    def __init__(
        self,
        command: Sequence[str] | None = None,
        log_path: Path | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.command = list(command) if command else engine_command_from_env()
        self.state = STOPPED
        self.model: LoadedEvent | None = None
        self.environment: dict[str, str] = {}  # what the engine process gets besides this process's environment
        self._thread = QThread()
        self._thread.setObjectName("engine-bridge")
        self._worker = EngineProcessWorker(self.command, log_path)
        self._worker.moveToThread(self._thread)
        self._thread.finished.connect(self._worker.deleteLater)
        for name in ("hello", "progress", "token", "prefill", "tool_call", "stats", "done", "error",
                     "unloaded", "engine_lost", "restarting", "gave_up", "protocol_error", "peer_lost", "notice"):
            getattr(self._worker, name).connect(getattr(self, name))
        self._worker.loaded.connect(self._on_loaded)
        self.server: ServerEvent | None = None  # the local server's last reported state
        self._worker.server_state.connect(self._on_server_state)
        self._worker.state_changed.connect(self._on_state)
        queued = Qt.ConnectionType.QueuedConnection
        self._start_requested.connect(self._worker.start, queued)
        self._load_requested.connect(self._worker.load, queued)
        self._chat_requested.connect(self._worker.chat, queued)
        self._cancel_requested.connect(self._worker.cancel, queued)
        self._unload_requested.connect(self._worker.unload, queued)
        self._restart_requested.connect(self._worker.restart, queued)
        self._kill_requested.connect(self._worker.kill_for_test, queued)
        self._serve_requested.connect(self._worker.serve, queued)
        self._relaunch_requested.connect(self._worker.relaunch, queued)
        self._shutdown_requested.connect(self._worker.shutdown, Qt.ConnectionType.BlockingQueuedConnection)
        self._thread.start()

    def start(self) -> None:
        """Start the engine process."""
        self._start_requested.emit()

    def load(self, model_dir: str | Path, options: EngineOptions | None = None) -> None:
        """Load the model in `model_dir` (starting the engine if needed)."""
        self._load_requested.emit(LoadRequest(model_dir=str(model_dir), options=options or EngineOptions()))

    def chat(self, request: ChatRequest) -> None:
        """Send a chat request; its tokens, tool calls and done event come back as signals."""
        self._chat_requested.emit(request)

    def cancel(self, request_id: str) -> None:
        """Stop a chat request; its done event says "cancelled"."""
        self._cancel_requested.emit(request_id)

    def unload(self) -> None:
        """Unload the model."""
        self._unload_requested.emit()

    def restart(self) -> None:
        """Try again after `gave_up`."""
        self._restart_requested.emit()

    def kill_engine(self) -> None:
        """SIGKILL the engine process (to test or demonstrate crash recovery)."""
        self._kill_requested.emit()

    def set_engine_environment(self, environment: dict[str, str]) -> None:
        """Variables the engine process gets (e.g. MLX_RANK, MLX_HOSTFILE); a running engine restarts with them."""
        self.environment = dict(environment)
        self._relaunch_requested.emit(dict(environment))

    def set_error_wording(self, wording: Callable[[ErrorEvent], str] | None) -> None:
        """Reword the engine's errors for people (e.g. a lost Mac named by its address) before anyone sees them."""
        self._worker.error_wording = wording

    def serve(self, enabled: bool, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None) -> None:
        """Serve the loaded model over the OpenAI API from the engine (or stop); `server_state` reports back."""
        self._serve_requested.emit(ServeRequest(enabled=enabled, host=host, port=port, api_key=api_key or None))

    @Slot(object)
    def _on_server_state(self, event: ServerEvent) -> None:
        self.server = event
        self.server_state.emit(event)

    def is_ready(self) -> bool:
        """Whether a model is loaded and no request is running."""
        return self.state == READY

    def shutdown(self) -> None:
        """Stop the engine and the bridge thread; blocks for at most a few seconds."""
        if self._thread.isRunning():
            self._shutdown_requested.emit()
            self._thread.quit()
            self._thread.wait(int((SHUTDOWN_GRACE_S + 3) * 1000))

    @Slot(object)
    def _on_loaded(self, event: LoadedEvent) -> None:
        self.model = event
        self.loaded.emit(event)

    @Slot(str)
    def _on_state(self, state: str) -> None:
        self.state = state
        if state in (IDLE, STOPPED, FAILED):
            self.model = None
        self.state_changed.emit(state)
