"""Live gauges: rates over the time since the last sample, plus memory pressure and RSS."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from engine import platform_info
from engine.serving.protocol import LiveFigures, MessageFigures

if TYPE_CHECKING:
    from engine.engine import Engine

log = logging.getLogger(__name__)


class LiveStats:
    """Samples the engine's expert counters, the disk's read counter, RSS and memory pressure."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._engine: "Engine | None" = None
        self._last: tuple[float, int, int | None] | None = None  # time, engine bytes, disk bytes

    def attach(self, engine: "Engine | None") -> None:
        """Follow this engine's counters (None after unload)."""
        with self._lock:
            self._engine = engine
            self._last = None

    def sample(self, turn: MessageFigures | None) -> LiveFigures:
        """Figures now; rates are over the time since the previous sample."""
        with self._lock:
            engine = self._engine
            counters: dict[str, Any] = engine.expert_counters() if engine is not None else {}
            disk = _disk_bytes(engine)
            now = time.monotonic()
            engine_bytes = int(counters.get("bytes_read", 0))
            engine_bps = 0.0
            disk_bps: float | None = None
            if self._last is not None:
                t0, e0, d0 = self._last
                dt = now - t0
                if dt > 0:
                    engine_bps = max(0, engine_bytes - e0) / dt
                    if disk is not None and d0 is not None:
                        disk_bps = max(0, disk - d0) / dt
            self._last = (now, engine_bytes, disk)
        hits, misses = int(counters.get("cache_hits", 0)), int(counters.get("cache_misses", 0))
        pressure = platform_info.memory_pressure()
        figures = LiveFigures(
            engine_read_bps=engine_bps,
            disk_read_bps=disk_bps,
            cache_hit_rate=hits / (hits + misses) if hits + misses else 0.0,
            cache_saved_bytes=int(counters.get("cache_saved_bytes", 0)),
            resident_bytes=int(counters.get("resident_bytes", 0)),
            expert_cache_bytes=int(counters.get("expert_cache_bytes", 0)),
            expert_cache_full_bytes=int(counters.get("expert_cache_full_bytes", 0)),
            rss_bytes=platform_info.process_rss_bytes(),
            pressure_level=pressure.level,
            pressure_raw=pressure.detail or f"{pressure.raw:g}",
            pressure_value=float(pressure.raw),
            pressure_source=pressure.source,
        )
        if engine is not None:
            from engine.model.mlx_memory import mlx_memory

            mem = mlx_memory()
            figures.mlx_active_bytes = mem.active_bytes
            figures.mlx_cached_bytes = mem.cached_bytes
            figures.mlx_peak_bytes = mem.peak_bytes
        if turn is not None:
            figures.decode_tps = turn.decode_tps
            figures.prompt_tps = turn.prompt_tps
            figures.ttft_s = turn.ttft_s
            figures.prompt_tokens = turn.prompt_tokens
            figures.generated_tokens = turn.generated_tokens
        return figures


def _disk_bytes(engine: "Engine | None") -> int | None:
    """Cumulative read bytes of the disk holding the model (all disks when unknown)."""
    try:
        path = engine.model_dir if engine is not None else "."
        return platform_info.disk_read_counters(path).read_bytes
    except OSError:
        log.debug("disk counters unavailable", exc_info=True)
        return None
