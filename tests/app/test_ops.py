"""BackgroundOp: work on a pool thread, success/failure/progress delivered on the GUI thread."""

from __future__ import annotations

import threading
import time

import pytest

from app.ops import BackgroundOp, OpContext, Progress
from app.qt import QObject, QThread, QThreadPool


@pytest.fixture
def pool():
    pool = QThreadPool()
    pool.setMaxThreadCount(2)
    yield pool
    pool.waitForDone(5000)


def test_success_is_delivered_on_gui_thread_with_op_run_on_worker(qtbot, pool: QThreadPool) -> None:
    gui_thread = QThread.currentThread()
    seen: dict[str, object] = {}

    def op(ctx: OpContext) -> int:
        seen["op_thread"] = threading.get_ident()
        return 6 * 7

    def on_success(result: int) -> None:
        seen["result"] = result
        seen["callback_on_gui_thread"] = QThread.currentThread() is gui_thread
        seen["callback_thread"] = threading.get_ident()

    BackgroundOp(None, op, on_success).run(pool)
    qtbot.waitUntil(lambda: "result" in seen, timeout=3000)
    assert seen["result"] == 42
    assert seen["callback_on_gui_thread"] is True
    assert seen["callback_thread"] == threading.main_thread().ident
    assert seen["op_thread"] != threading.main_thread().ident


def test_failure_is_delivered_on_gui_thread_with_the_exception(qtbot, pool: QThreadPool) -> None:
    errors: list[tuple[BaseException, bool]] = []

    def op(ctx: OpContext) -> None:
        raise FileNotFoundError("notes.txt is gone")

    def on_failure(error: BaseException) -> None:
        errors.append((error, threading.get_ident() == threading.main_thread().ident))

    BackgroundOp(None, op, lambda _: pytest.fail("success must not be called"), on_failure).run(pool)
    qtbot.waitUntil(lambda: bool(errors), timeout=3000)
    error, on_main = errors[0]
    assert isinstance(error, FileNotFoundError) and "notes.txt" in str(error)
    assert on_main


def test_progress_reaches_gui_thread_in_order_and_ends_with_last_unit(qtbot, pool: QThreadPool) -> None:
    reports: list[tuple[Progress, bool]] = []
    done: list[str] = []

    def op(ctx: OpContext) -> str:
        for index in range(1, 201):
            ctx.report(index, 200, "reading")
            time.sleep(0.001)
        return "ok"

    (BackgroundOp(None, op, done.append)
     .with_progress(lambda p: reports.append((p, threading.get_ident() == threading.main_thread().ident)))
     .run(pool))
    qtbot.waitUntil(lambda: bool(done), timeout=5000)
    assert reports, "no progress delivered"
    assert all(on_main for _, on_main in reports)
    values = [p.done for p, _ in reports]
    assert values == sorted(values)
    assert reports[-1][0] == Progress(200, 200, "reading")
    assert len(reports) < 200  # throttled: reports closer than 50 ms apart are merged


def test_cancel_stops_callbacks_and_op_sees_flag(qtbot, pool: QThreadPool) -> None:
    started = threading.Event()
    saw_cancel = threading.Event()
    called: list[object] = []

    def op(ctx: OpContext) -> str:
        started.set()
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            if ctx.cancelled:
                saw_cancel.set()
                return "stopped"
            time.sleep(0.005)
        return "finished"

    background = BackgroundOp(None, op, called.append, called.append).run(pool)
    assert started.wait(3)
    background.cancel()
    qtbot.waitUntil(saw_cancel.is_set, timeout=3000)
    pool.waitForDone(3000)
    qtbot.wait(50)  # let any queued delivery run
    assert called == []


def test_no_callback_after_parent_is_destroyed(qtbot, pool: QThreadPool) -> None:
    release = threading.Event()
    called: list[object] = []
    parent = QObject()
    BackgroundOp(parent, lambda ctx: release.wait(3), called.append, called.append).run(pool)
    parent.deleteLater()
    qtbot.waitUntil(lambda: _is_deleted(parent), timeout=2000)
    release.set()
    pool.waitForDone(3000)
    qtbot.wait(50)
    assert called == []


def _is_deleted(obj: QObject) -> bool:
    try:
        obj.objectName()
    except RuntimeError:
        return True
    return False


def test_op_cannot_be_started_twice(qtbot, pool: QThreadPool) -> None:
    results: list[int] = []
    background = BackgroundOp(None, lambda ctx: 1, results.append).run(pool)
    with pytest.raises(RuntimeError, match="already started"):
        background.run(pool)
    qtbot.waitUntil(lambda: results == [1], timeout=3000)


def test_default_failure_handler_logs(qtbot, pool: QThreadPool, caplog: pytest.LogCaptureFixture) -> None:
    def op(ctx: OpContext) -> None:
        raise ValueError("bad tool arguments")

    BackgroundOp(None, op, lambda _: None).run(pool)
    qtbot.waitUntil(lambda: "background operation failed" in caplog.text, timeout=3000)
    assert "bad tool arguments" in caplog.text


def test_many_ops_all_deliver(qtbot, pool: QThreadPool) -> None:
    results: list[int] = []
    for value in range(50):
        BackgroundOp(None, lambda ctx, v=value: v * v, results.append).run(pool)
    qtbot.waitUntil(lambda: len(results) == 50, timeout=5000)
    assert sorted(results) == [v * v for v in range(50)]
