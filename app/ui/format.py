"""Human-readable numbers for gauges, message figures and dialogs."""

from __future__ import annotations

from engine.serving.protocol import MessageFigures, PrefillEvent

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


def time_left(value: float) -> str:
    """Format an estimate of the time left: 42 -> 'about 42 s', 130 -> 'about 2 min 10 s'."""
    whole = max(1, round(value))
    if whole < 60:
        return f"about {whole} s"
    minutes, secs = divmod(whole, 60)
    return f"about {minutes} min {secs} s" if secs else f"about {minutes} min"


def prefill_note(event: PrefillEvent) -> str:
    """What an answer shows while its prompt is read: share, tokens, layer, bytes and time left."""
    parts = [f"reading the prompt {percent(event.fraction)}", f"{event.tokens_total:,} tokens"]
    if event.layers_total:
        layer = f"layer {min(event.layers_done + 1, event.layers_total)}/{event.layers_total}"
        if event.passes_total > 1:
            layer += f" of pass {event.pass_index + 1}/{event.passes_total}"
        parts.append(layer)
    if event.bytes_read:
        parts.append(f"{human_bytes(event.bytes_read)} read")
    if event.seconds_left is not None and event.fraction < 1.0:
        parts.append(f"{time_left(event.seconds_left)} left")
    return " · ".join(parts)
