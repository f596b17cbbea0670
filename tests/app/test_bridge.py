"""EngineBridge against the scripted engine: typed signals, GUI-thread delivery, crash recovery."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from app.bridge import READY, RESTARTING, EngineBridge, describe_exit
from app.qt import QObject, Slot
from engine.serving.protocol import ChatMessage, ChatRequest, DoneEvent, ErrorEvent, LoadedEvent


class Recorder(QObject):
    """Collects bridge signals in the GUI thread and notes which thread delivered them."""

    def __init__(self, bridge: EngineBridge) -> None:
        super().__init__()
        self.tokens: list[tuple[str, str, str]] = []
        self.done: list[DoneEvent] = []
        self.loaded: list[LoadedEvent] = []
        self.lost: list[tuple[str, list[str]]] = []
        self.errors: list[ErrorEvent] = []
        self.threads: set[int] = set()
        bridge.token.connect(self.on_token)
        bridge.done.connect(self.on_done)
        bridge.loaded.connect(self.on_loaded)
        bridge.engine_lost.connect(self.on_lost)
        bridge.error.connect(self.on_error)

    @Slot(str, str, str)
    def on_token(self, rid: str, text: str, kind: str) -> None:
        self.threads.add(threading.get_ident())
        self.tokens.append((rid, text, kind))

    @Slot(object)
    def on_done(self, event: DoneEvent) -> None:
        self.done.append(event)

    @Slot(object)
    def on_loaded(self, event: LoadedEvent) -> None:
        self.loaded.append(event)

    @Slot(str, object)
    def on_lost(self, reason: str, ids: list[str]) -> None:
        self.lost.append((reason, ids))

    @Slot(object)
    def on_error(self, event: ErrorEvent) -> None:
        self.errors.append(event)

    def answer(self, rid: str) -> str:
        return "".join(t for r, t, k in self.tokens if r == rid and k == "answer")


def chat(rid: str, text: str) -> ChatRequest:
    return ChatRequest(id=rid, messages=[ChatMessage(role="user", content=text)])


def load_fake(qtbot, bridge: EngineBridge, rec: Recorder, model: Path) -> None:
    bridge.load(model)
    qtbot.waitUntil(lambda: bridge.state == READY and bool(rec.loaded), timeout=10_000)
    assert rec.loaded[-1].model_dir == str(model)


def test_full_turn_arrives_as_typed_signals_in_gui_thread(qtbot, fake_bridge: EngineBridge, tmp_path: Path) -> None:
    rec = Recorder(fake_bridge)
    load_fake(qtbot, fake_bridge, rec, tmp_path / "model-a")
    fake_bridge.chat(chat("r1", "hello there"))
    qtbot.waitUntil(lambda: bool(rec.done), timeout=10_000)
    assert rec.done[0].id == "r1" and rec.done[0].finish_reason == "stop"
    assert rec.answer("r1") == "Echo: hello there "
    assert ("r1", "Thinking about it.", "reasoning") in rec.tokens
    assert rec.threads == {threading.get_ident()}  # delivered in the GUI (test) thread
    assert fake_bridge.state == READY


def test_cancel_ends_with_cancelled(qtbot, fake_bridge: EngineBridge, tmp_path: Path) -> None:
    rec = Recorder(fake_bridge)
    load_fake(qtbot, fake_bridge, rec, tmp_path / "m")
    fake_bridge.chat(chat("slow1", "slow"))
    qtbot.waitUntil(lambda: len(rec.tokens) >= 3, timeout=10_000)
    fake_bridge.cancel("slow1")
    qtbot.waitUntil(lambda: bool(rec.done), timeout=10_000)
    assert rec.done[0].finish_reason == "cancelled"
    assert len(rec.tokens) < 100


@pytest.mark.parametrize(
    ("prompt", "expected_reason"),
    [("crash", "killed (SIGKILL)"), ("oom", "ran out of memory"), ("fatal", "Out of memory while reading experts")],
)
def test_engine_death_mid_answer_restarts_and_reloads(
    qtbot, fake_bridge: EngineBridge, tmp_path: Path, prompt: str, expected_reason: str
) -> None:
    rec = Recorder(fake_bridge)
    states: list[str] = []
    fake_bridge.state_changed.connect(lambda s: states.append(s))
    model = tmp_path / "model-b"
    load_fake(qtbot, fake_bridge, rec, model)
    fake_bridge.chat(chat("r-dies", prompt))
    qtbot.waitUntil(lambda: bool(rec.lost), timeout=15_000)
    reason, ids = rec.lost[0]
    assert expected_reason in reason
    assert ids == ["r-dies"]
    assert rec.answer("r-dies")  # the partial text reached the app before the death
    qtbot.waitUntil(lambda: len(rec.loaded) == 2 and fake_bridge.state == READY, timeout=15_000)
    assert rec.loaded[1].model_dir == str(model)  # the same model was loaded again
    assert RESTARTING in states
    fake_bridge.chat(chat("r-after", "still here"))
    qtbot.waitUntil(lambda: any(d.id == "r-after" for d in rec.done), timeout=10_000)
    assert rec.answer("r-after") == "Echo: still here "


def test_kill_engine_from_the_app_is_recovered(qtbot, fake_bridge: EngineBridge, tmp_path: Path) -> None:
    rec = Recorder(fake_bridge)
    load_fake(qtbot, fake_bridge, rec, tmp_path / "m")
    fake_bridge.chat(chat("s", "slow"))
    qtbot.waitUntil(lambda: len(rec.tokens) >= 2, timeout=10_000)
    fake_bridge.kill_engine()
    qtbot.waitUntil(lambda: bool(rec.lost), timeout=10_000)
    assert rec.lost[0][1] == ["s"]
    qtbot.waitUntil(lambda: len(rec.loaded) == 2, timeout=15_000)


def test_missing_engine_binary_reports_and_gives_up(qtbot, tmp_path: Path) -> None:
    bridge = EngineBridge(["/nonexistent/moebar-engine"], log_path=None)
    reasons: list[str] = []
    bridge.gave_up.connect(reasons.append)
    try:
        bridge.start()
        qtbot.waitUntil(lambda: bool(reasons), timeout=5000)
        assert "could not be started" in reasons[0]
        assert bridge.state == "failed"
    finally:
        bridge.shutdown()


def test_chat_while_engine_down_is_answered_with_an_error(qtbot, fake_engine_command: list[str]) -> None:
    bridge = EngineBridge(fake_engine_command, log_path=None)
    rec = Recorder(bridge)
    try:
        bridge.chat(chat("early", "hi"))
        qtbot.waitUntil(lambda: bool(rec.done), timeout=5000)
        assert rec.done[0].finish_reason == "error"
        assert rec.errors[0].code == "engine_unavailable"
    finally:
        bridge.shutdown()


def test_describe_exit_names_the_cause() -> None:
    assert "SIGKILL" in describe_exit(9, True, [])
    assert "SIGSEGV" in describe_exit(11, True, [])
    assert "out of memory" in describe_exit(1, False, ["Traceback", "MemoryError"])
    assert "(exit code 2): bad flag" in describe_exit(2, False, ["bad flag"])


def test_qt_binding_emit_keeps_reference_counts() -> None:
    """PySide6 6.12.0's Signal.emit() drops a reference to True on every call, so a process
    aborts after a few hundred emits ("bool_dealloc"). The bridge emits per token; this fails
    with a clear message on such a binding instead of an abort later."""
    import sys

    from app.qt import QObject, Signal

    class Emitter(QObject):
        fired = Signal(str)

    emitter = Emitter()
    before = sys.getrefcount(True)
    for _ in range(50):
        emitter.fired.emit("x")
    lost = before - sys.getrefcount(True)
    import PySide6

    assert lost < 50, f"PySide6 {PySide6.__version__} leaks a reference to True per emit(); use another version"
