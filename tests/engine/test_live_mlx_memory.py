"""MLX's active, cached and peak memory in the live figures (and through the protocol)."""

from __future__ import annotations

import json

from engine.serving import protocol
from engine.serving.live_stats import LiveStats


def test_live_figures_carry_mlx_memory_of_a_loaded_engine(tiny_model) -> None:  # type: ignore[no-untyped-def]
    import mlx.core as mx

    from engine.engine import Engine
    from engine.types import EngineOptions, SamplingParams

    engine = Engine.load(tiny_model(), EngineOptions(cache_mb=None, device="cpu"), measure_disk=False)
    live = LiveStats()
    try:
        assert live.sample(None).mlx_active_bytes == 0  # nothing attached
        live.attach(engine)
        list(engine.generate(list(range(1000, 1032)), SamplingParams(max_tokens=4)))
        f = live.sample(None)
    finally:
        engine.close()
    assert f.mlx_active_bytes >= engine.plan.dense_bytes  # the dense weights are MLX buffers
    assert f.mlx_peak_bytes >= f.mlx_active_bytes
    assert 0 <= f.mlx_cached_bytes <= mx.get_memory_limit()
    line = protocol.encode(protocol.StatsEvent(figures=f, id=None))
    assert json.loads(line)["figures"]["mlx_peak_bytes"] == f.mlx_peak_bytes
    back = protocol.decode_event(line)
    assert isinstance(back, protocol.StatsEvent) and back.figures.mlx_active_bytes == f.mlx_active_bytes
