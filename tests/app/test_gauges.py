"""Throttle and gauges panel: figures coalesce into a few repaints a second, never per event."""

from __future__ import annotations

import types

import pytest

import app.throttle as throttle_module
from app.throttle import Throttle
from app.ui.gauges import REFRESH_MS, GaugesPanel
from engine.serving.protocol import LiveFigures


def test_throttle_runs_first_call_at_once_and_merges_a_burst(qtbot: pytest.FixtureRequest) -> None:
    calls: list[int] = []
    throttle = Throttle(calls.append, 100)
    for i in range(50):
        throttle(i)
    assert calls == [0]  # first call immediately, the rest merged
    assert throttle.has_pending()
    qtbot.waitUntil(lambda: calls == [0, 49], timeout=30_000)  # a bound, not a speed
    assert not throttle.has_pending()


def test_throttle_flush_and_cancel(qtbot: pytest.FixtureRequest) -> None:
    calls: list[str] = []
    throttle = Throttle(calls.append, 10_000)
    throttle("a")
    throttle("b")
    throttle.flush()
    assert calls == ["a", "b"]
    throttle("c")
    throttle.cancel()
    qtbot.wait(50)
    assert calls == ["a", "b"]


def test_throttle_steady_stream_is_limited_to_its_rate(monkeypatch: pytest.MonkeyPatch, qtbot: pytest.FixtureRequest) -> None:
    """A call every 125 ms of a fake clock for 8 s through a 1 s throttle: one call per second.

    (Steps of 1/8 s are exact in binary, so the arithmetic of the intervals is exact too.)
    """
    now = [0.0]
    monkeypatch.setattr(throttle_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    calls: list[int] = []
    throttle = Throttle(calls.append, 1000)
    timer_started_at: float | None = None
    for i in range(64):
        now[0] = i / 8
        # the QTimer, on the fake clock: it fires once its interval has passed since it started
        if timer_started_at is not None and now[0] >= timer_started_at + throttle._timer.interval() / 1000:
            assert throttle._timer.isActive()
            throttle._timer.stop()
            throttle._on_timeout()
            timer_started_at = None
        was_active = throttle._timer.isActive()
        throttle(i)
        if throttle._timer.isActive() and not was_active:
            timer_started_at = now[0]
    throttle.flush()
    # at once, then the latest value at the end of each second, then the flushed last one
    assert calls == [0, 7, *range(15, 56, 8), 63]


def test_gauges_show_latest_figures_on_timer_not_per_event(qtbot: pytest.FixtureRequest) -> None:
    panel = GaugesPanel()
    qtbot.addWidget(panel)
    panel.set_working(True)
    for n in range(200):  # a burst of stats events inside one refresh period
        panel.set_figures(
            LiveFigures(
                decode_tps=3.0 + n / 100,
                prompt_tps=40.0,
                ttft_s=0.8,
                engine_read_bps=2.5e9,
                disk_read_bps=2.6e9,
                cache_hit_rate=0.71,
                cache_saved_bytes=3_000_000_000,
                resident_bytes=512_000_000,
                rss_bytes=5_500_000_000,
                pressure_level="warning",
                pressure_raw="some avg10=4.00",
            )
        )
    assert panel.repaint_count == 0
    qtbot.waitUntil(lambda: panel.repaint_count >= 1, timeout=30_000)  # a bound, not a speed
    assert panel.repaint_count == 1
    assert panel.value_text("decode") == "4.99 tok/s"
    assert panel.value_text("prompt") == "40.0 tok/s · 800 ms"
    assert panel.value_text("ssd") == "2.5 GB/s · 2.6 GB/s"
    assert panel.value_text("pressure") == "warning"
    assert panel.pressure_bar.level() == "warning"
    assert panel.value_text("cache") == "71% · 3.0 GB saved"
    assert panel.value_text("memory") == "5.5 GB · 512.0 MB"
    qtbot.wait(3 * REFRESH_MS)
    assert panel.repaint_count == 1  # nothing new, no repaint of the labels
    assert panel.sparkline.values()[-1] == pytest.approx(4.99)


def test_history_line_stops_when_idle(qtbot: pytest.FixtureRequest) -> None:
    panel = GaugesPanel()
    qtbot.addWidget(panel)
    panel.set_figures(LiveFigures(decode_tps=2.0))
    panel.set_working(False)
    qtbot.wait(3 * REFRESH_MS)
    assert panel.sparkline.values() == []
    panel.set_working(True)
    qtbot.waitUntil(lambda: len(panel.sparkline.values()) >= 2, timeout=30_000)  # a bound, not a speed
