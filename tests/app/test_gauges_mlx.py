"""The gauges panel shows MLX's memory (in use, cached, peak) from the engine's live figures,
on the panel's timer like the other gauges, and in the memory gauge's detail."""

from __future__ import annotations

import pytest

from app.qt import QtWidgets
from app.ui.gauges import NBSP, REFRESH_MS, GaugesPanel, mlx_memory_text
from engine.serving.protocol import LiveFigures


def _plain(text: str) -> str:
    return text.replace(NBSP, " ")


def _figures(**kw: int) -> LiveFigures:
    return LiveFigures(rss_bytes=1_900_000_000, resident_bytes=300_000_000, **kw)  # type: ignore[arg-type]


def test_mlx_memory_is_shown_on_the_timer(qtbot: pytest.FixtureRequest) -> None:
    # in a column as narrow as the window's side panel, with room below it as there
    column = QtWidgets.QWidget()
    qtbot.addWidget(column)
    layout = QtWidgets.QVBoxLayout(column)
    panel = GaugesPanel(parent=column)
    layout.addWidget(panel)
    layout.addStretch(1)
    column.resize(320, 700)
    column.show()
    for peak in range(1_300_000_000, 1_400_000_001, 1_000_000):  # a burst inside one refresh period
        panel.set_figures(_figures(mlx_active_bytes=1_200_000_000, mlx_cached_bytes=200_000_000, mlx_peak_bytes=peak))
    assert panel.value_text("mlx") == "MLX —"  # nothing before the timer
    qtbot.waitUntil(lambda: panel.repaint_count >= 1, timeout=30_000)  # a bound, not a speed
    assert panel.repaint_count == 1
    assert _plain(panel.value_text("mlx")) == "MLX 1.2 GB in use · 200.0 MB cached · peak 1.4 GB"
    label = panel._labels["mlx"]
    assert label.isVisible()
    # all of it shown once the layout has run (wrapped between figures where the panel is narrow)
    qtbot.waitUntil(lambda: label.height() >= label.heightForWidth(label.width()), timeout=30_000)
    tip = _plain(panel._labels["memory"].toolTip())
    assert "Now: MLX 1.2 GB in use · 200.0 MB cached · peak 1.4 GB" in tip
    qtbot.wait(3 * REFRESH_MS)
    assert panel.repaint_count == 1  # no new figures, no new text


def test_an_engine_without_mlx_figures_shows_a_dash(qtbot: pytest.FixtureRequest) -> None:
    panel = GaugesPanel()
    qtbot.addWidget(panel)
    panel.set_figures(_figures())
    qtbot.waitUntil(lambda: panel.repaint_count >= 1, timeout=30_000)  # a bound, not a speed
    assert panel.value_text("mlx") == "MLX —"
    assert "no MLX figures" in panel._labels["memory"].toolTip()
    assert _plain(mlx_memory_text(_figures(mlx_cached_bytes=5))) == "MLX 0 B in use · 5 B cached · peak 0 B"
    assert "peak" + NBSP + "0" in mlx_memory_text(_figures(mlx_cached_bytes=5))  # never wrapped inside a figure
