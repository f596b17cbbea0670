"""Human-readable numbers for gauges, message figures and dialogs."""

from __future__ import annotations

from engine.serving.protocol import MessageFigures

_UNITS = ("B", "KB", "MB", "GB", "TB")


def human_bytes(count: float) -> str:
    """Format a byte count with a decimal unit: 7077888 -> '7.1 MB'."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1000 or unit == _UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def human_rate(bytes_per_second: float | None) -> str:
    """Format a read rate: 5.5e9 -> '5.5 GB/s'; None -> '—'."""
    if bytes_per_second is None:
        return "—"
    return f"{human_bytes(bytes_per_second)}/s"


def tokens_per_second(tps: float) -> str:
    """Format tokens per second with sensible precision for slow and fast engines."""
    if tps <= 0:
        return "—"
    return f"{tps:.2f} tok/s" if tps < 10 else f"{tps:.1f} tok/s"


def seconds(value: float) -> str:
    """Format a duration: 0.042 -> '42 ms', 3.2 -> '3.2 s'."""
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"


def percent(fraction: float) -> str:
    """Format a fraction in [0, 1] as a whole percentage."""
    return f"{fraction * 100:.0f}%"


def message_figures_line(figures: MessageFigures) -> str:
    """The one-line summary shown under a finished answer."""
    parts = [
        f"prompt {tokens_per_second(figures.prompt_tps)}",
        f"first token {seconds(figures.ttft_s) if figures.ttft_s > 0 else '—'}",
        f"decode {tokens_per_second(figures.decode_tps)}",
        f"{figures.generated_tokens} tokens",
        f"experts read {human_bytes(figures.bytes_read)}",
        f"cache hits {percent(figures.cache_hit_rate)}",
    ]
    if figures.reused_tokens:
        parts.insert(1, f"{figures.reused_tokens} prompt tokens reused")
    return " · ".join(parts)
