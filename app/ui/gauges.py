"""Gauges panel: live decode tok/s with a history line, SSD read rate, memory pressure, cache.

Stats events only store the latest figures; a timer repaints a few times a second, so the
panel never repaints per token or per event.
"""

from __future__ import annotations

from collections import deque

from app.qt import Qt, QTimer, QtCore, QtGui, QtWidgets, Slot
from app.ui.format import human_bytes, human_rate, percent, seconds, tokens_per_second
from app.ui.theme import LIGHT, Theme
from engine.serving.protocol import LiveFigures

NBSP = "\u00a0"
REFRESH_MS = 250  # four repaints a second at most
HISTORY_SAMPLES = 120  # 30 s of decode tok/s at REFRESH_MS

PRESSURE_TEXT = {
    "normal": "normal",
    "warning": "warning",
    "critical": "critical",
    "unknown": "unknown",
}


def pressure_colour(level: str, theme: Theme) -> str:
    """The colour of a memory-pressure level in `theme`."""
    return {"normal": theme.ok, "warning": theme.warning, "critical": theme.error}.get(level, theme.muted)


class Sparkline(QtWidgets.QWidget):
    """A short line of recent values, scaled to its own maximum."""

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._values: deque[float] = deque(maxlen=HISTORY_SAMPLES)
        self._theme = theme
        self.setMinimumSize(120, 28)
        self.setSizePolicy(QtWidgets.QSizePolicy.Policy.Expanding, QtWidgets.QSizePolicy.Policy.Fixed)

    def values(self) -> list[float]:
        """The values currently drawn, oldest first."""
        return list(self._values)

    def append(self, value: float) -> None:
        """Add a value at the right end and schedule a repaint."""
        self._values.append(value)
        self.update()

    def set_theme(self, theme: Theme) -> None:
        """Redraw in another theme's colours."""
        self._theme = theme
        self.update()

    def paintEvent(self, event: QtGui.QPaintEvent) -> None:  # noqa: N802 (Qt override)
        """Draw the line and a faint fill under it."""
        painter = QtGui.QPainter(self)
        painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        rect = QtCore.QRectF(self.rect()).adjusted(1, 2, -1, -2)
        painter.setPen(QtGui.QPen(QtGui.QColor(self._theme.border), 1))
        painter.drawLine(rect.bottomLeft(), rect.bottomRight())
        if len(self._values) < 2:
            painter.end()
            return
        top = max(self._values) or 1.0
        step = rect.width() / (HISTORY_SAMPLES - 1)
        start_x = rect.right() - step * (len(self._values) - 1)
        path = QtGui.QPainterPath()
        for i, value in enumerate(self._values):
            point = QtCore.QPointF(start_x + i * step, rect.bottom() - rect.height() * value / top)
            if i == 0:
                path.moveTo(point)
            else:
                path.lineTo(point)
        fill = QtGui.QPainterPath(path)
        fill.lineTo(rect.right(), rect.bottom())
        fill.lineTo(start_x, rect.bottom())
        fill.closeSubpath()
        accent = QtGui.QColor(self._theme.accent)
        shade = QtGui.QColor(accent)
        shade.setAlpha(50)
        painter.fillPath(fill, shade)
        painter.setPen(QtGui.QPen(accent, 1.6))
        painter.drawPath(path)
        painter.end()


class PressureLevel(QtWidgets.QWidget):
    """A coloured bar for memory pressure: green, amber or red (grey when unknown)."""

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self._theme = theme
        self._level = "unknown"
        self.setFixedHeight(8)
        self.setMinimumWidth(60)

    def level(self) -> str:
        """The level drawn now."""
        return self._level

    def set_level(self, level: str) -> None:
        """Show `level` (normal, warning, critical or unknown)."""
        if level != self._level:
            self._level = level
            self.update()

    def set_theme(self, theme: Theme) -> None:
        """Redraw in another theme's colours."""
        self._theme = theme
        self.update()

    def paintEvent(self, event: QtGui.QPaintEvent) -> None:  # noqa: N802 (Qt override)
        """Three segments; those up to the current level are lit in its colour."""
        painter = QtGui.QPainter(self)
        painter.setRenderHint(QtGui.QPainter.RenderHint.Antialiasing)
        lit = {"normal": 1, "warning": 2, "critical": 3}.get(self._level, 0)
        colour = QtGui.QColor(pressure_colour(self._level, self._theme))
        off = QtGui.QColor(self._theme.border)
        gap = 3.0
        width = (self.width() - 2 * gap) / 3
        for i in range(3):
            rect = QtCore.QRectF(i * (width + gap), 0, width, self.height())
            painter.setPen(Qt.PenStyle.NoPen)
            painter.setBrush(colour if i < lit else off)
            painter.drawRoundedRect(rect, 3, 3)
        painter.end()


# What each gauge measures (its tooltip).
GAUGE_TIPS = {
    "decode": "Tokens generated per second by the answer being written (the line: its recent history).",
    "prompt": "How fast the prompt was read (tokens per second), and the wait until the first token.",
    "ssd": "Bytes per second the engine reads from the model's files, and the disk's own read rate "
           "(other programs included).",
    "pressure": "How hard the system is pressed for memory (normal, warning, critical), as the OS reports it.",
    "cache": "Share of expert reads served from the in-memory expert cache instead of the disk, and the "
             "bytes those hits spared.",
    "memory": "Memory of the engine process, and the part of it the expert cache holds.",
    "mlx": "MLX's own buffers: in use now (weights, expert slots, KV cache, activations), freed buffers MLX "
           "keeps for reuse (held small, so that the OS page cache keeps the RAM), and the most in use since "
           "the engine started.",
}


def mlx_memory_text(figures: LiveFigures) -> str:
    """'MLX 1.2 GB in use · 200.0 MB cached · peak 1.4 GB' ('MLX —' from an engine that sends none).

    Each figure's words are joined by no-break spaces, so a narrow panel wraps between figures.
    """
    active, cached, peak = figures.mlx_active_bytes, figures.mlx_cached_bytes, figures.mlx_peak_bytes
    if not (active or cached or peak):
        return "MLX —"
    parts = [f"MLX {human_bytes(active)} in use", f"{human_bytes(cached)} cached", f"peak {human_bytes(peak)}"]
    return " · ".join(p.replace(" ", NBSP) for p in parts)


class GaugesPanel(QtWidgets.QFrame):
    """The live figures of the engine; feed it with `set_figures`, it repaints on a timer."""

    def __init__(self, theme: Theme = LIGHT, parent: QtWidgets.QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("gaugesPanel")
        self._theme = theme
        self._latest: LiveFigures | None = None
        self._working = False
        self._dirty = False
        self.repaint_count = 0  # label refreshes so far (tests check the throttling)

        self.sparkline = Sparkline(theme, self)
        self.pressure_bar = PressureLevel(theme, self)
        self._labels: dict[str, QtWidgets.QLabel] = {}
        grid = QtWidgets.QGridLayout(self)
        grid.setContentsMargins(10, 8, 10, 8)
        grid.setHorizontalSpacing(12)
        grid.setVerticalSpacing(3)
        rows = [
            ("decode", "Decode"),
            ("prompt", "Prompt · first token"),
            ("ssd", "SSD read (engine · disk)"),
            ("pressure", "Memory pressure"),
            ("cache", "Expert cache hits · read saved"),
            ("memory", "Resident (process · cache)"),
        ]
        for row, (key, title) in enumerate(rows):
            name = QtWidgets.QLabel(title, self)
            name.setObjectName("gaugeName")
            value = QtWidgets.QLabel("—", self)
            value.setObjectName("gaugeValue")
            value.setAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
            self._labels[key] = value
            name.setToolTip(GAUGE_TIPS[key])
            name.setWordWrap(True)  # a long name takes two lines rather than being cut off by its figure
            value.setToolTip(GAUGE_TIPS[key])
            grid.addWidget(name, row * 2, 0)
            grid.addWidget(value, row * 2, 1)
            if key == "decode":
                grid.addWidget(self.sparkline, row * 2 + 1, 0, 1, 2)
            elif key == "pressure":
                grid.addWidget(self.pressure_bar, row * 2 + 1, 0, 1, 2)
        # MLX's buffers: one full-width line under the process's memory (a name column would wrap it)
        mlx = QtWidgets.QLabel(mlx_memory_text(LiveFigures()), self)
        mlx.setObjectName("gaugeName")
        mlx.setWordWrap(True)
        mlx.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        mlx.setToolTip(GAUGE_TIPS["mlx"])
        self._labels["mlx"] = mlx
        grid.addWidget(mlx, len(rows) * 2, 0, 1, 2)

        self._timer = QTimer(self)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self._refresh)
        self._timer.start()

    def value_text(self, key: str) -> str:
        """The text shown for gauge `key` (decode, prompt, ssd, pressure, cache, memory, mlx)."""
        return self._labels[key].text()

    @Slot(object)
    def set_figures(self, figures: LiveFigures) -> None:
        """Store the engine's latest figures; the next timer tick shows them."""
        self._latest = figures
        self._dirty = True

    @Slot(bool)
    def set_working(self, working: bool) -> None:
        """Whether a request is being served (the history line only moves while it is)."""
        self._working = working
        self._dirty = True

    def set_theme(self, theme: Theme) -> None:
        """Switch colours of the drawn parts."""
        self._theme = theme
        self.sparkline.set_theme(theme)
        self.pressure_bar.set_theme(theme)
        self._dirty = True

    @Slot()
    def _refresh(self) -> None:
        figures = self._latest
        if self._working and figures is not None:
            self.sparkline.append(figures.decode_tps)
        if not self._dirty or figures is None:
            return
        self._dirty = False
        self.repaint_count += 1
        disk = "" if figures.disk_read_bps is None else f" · {human_rate(figures.disk_read_bps)}"
        self._labels["decode"].setText(tokens_per_second(figures.decode_tps))
        ttft = seconds(figures.ttft_s) if figures.ttft_s > 0 else "—"
        self._labels["prompt"].setText(f"{tokens_per_second(figures.prompt_tps)} · {ttft}")
        self._labels["ssd"].setText(human_rate(figures.engine_read_bps) + disk)
        level = figures.pressure_level
        self._labels["pressure"].setText(PRESSURE_TEXT.get(level, level))
        self._labels["pressure"].setToolTip(f"{GAUGE_TIPS['pressure']}\nNow: {figures.pressure_raw or 'no reading on this system'}")
        self._labels["pressure"].setStyleSheet(f"color: {pressure_colour(level, self._theme)};")
        self.pressure_bar.set_level(level)
        saved = f" · {human_bytes(figures.cache_saved_bytes)} saved" if figures.cache_saved_bytes else ""
        self._labels["cache"].setText(percent(figures.cache_hit_rate) + saved)  # reads the hits spared
        reduced = ""  # the expert cache below the budget's size (memory pressure gave some back)
        if 0 < figures.expert_cache_bytes < figures.expert_cache_full_bytes:
            reduced = f" · cache {human_bytes(figures.expert_cache_bytes)} of {human_bytes(figures.expert_cache_full_bytes)}"
        self._labels["memory"].setText(f"{human_bytes(figures.rss_bytes)} · {human_bytes(figures.resident_bytes)}{reduced}")
        mlx = mlx_memory_text(figures)
        self._labels["mlx"].setText(mlx)
        self._labels["memory"].setToolTip(f"{GAUGE_TIPS['memory']}\nNow: {mlx if mlx != 'MLX —' else 'no MLX figures'}")
