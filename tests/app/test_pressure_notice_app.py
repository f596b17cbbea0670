"""The app side of memory pressure: the engine's notice reaches the bridge's signal, and the memory
gauge says when the expert cache is below the budget's size."""

from __future__ import annotations

from typing import Any

from app.bridge import EngineProcessWorker
from app.ui.gauges import NBSP, GaugesPanel
from engine.serving import protocol
from engine.serving.protocol import LiveFigures, NoticeEvent


def test_a_notice_line_becomes_the_notice_signal(qtbot: Any) -> None:
    worker = EngineProcessWorker(["true"], None)
    got: list[object] = []
    worker.notice.connect(got.append)
    line = protocol.encode(NoticeEvent(code="cache_reduced", message="Memory pressure (critical): expert cache reduced to 2.1 GB",
                                       level="warning", bytes=2_100_000_000))  # fmt: skip
    worker._dispatch(line.encode())
    (event,) = got
    assert isinstance(event, NoticeEvent) and event.level == "warning" and "2.1 GB" in event.message


def test_the_memory_gauge_shows_a_reduced_cache(qtbot: Any) -> None:
    panel = GaugesPanel()
    qtbot.addWidget(panel)
    panel.set_figures(LiveFigures(rss_bytes=3_000_000_000, resident_bytes=2_000_000_000,
                                  expert_cache_bytes=1_000_000_000, expert_cache_full_bytes=4_000_000_000))  # fmt: skip
    qtbot.waitUntil(lambda: panel.repaint_count >= 1, timeout=30_000)  # a bound, not a speed
    assert "cache 1.0 GB of 4.0 GB" in panel.value_text("memory").replace(NBSP, " ")
    panel.set_figures(LiveFigures(rss_bytes=3_000_000_000, resident_bytes=2_000_000_000,
                                  expert_cache_bytes=4_000_000_000, expert_cache_full_bytes=4_000_000_000))  # fmt: skip
    qtbot.waitUntil(lambda: panel.repaint_count >= 2, timeout=30_000)
    assert "cache" not in panel.value_text("memory")
