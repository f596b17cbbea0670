"""Run in a fresh process: load a model streamed, generate, print RSS figures as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil


def main() -> None:
    """argv: model_dir cache_mb|auto max_tokens [memory_limit_mb]."""
    model_dir, max_tokens = Path(sys.argv[1]), int(sys.argv[3])
    cache_mb = None if sys.argv[2] == "auto" else float(sys.argv[2])
    limit_mb = float(sys.argv[4]) if len(sys.argv) > 4 else None
    import mlx.core as mx  # noqa: F401
    from mlx_lm.utils import load_tokenizer

    from engine.engine import Engine
    from engine.model.mlx_memory import mlx_memory
    from engine.platform_info import peak_rss_bytes
    from engine.types import EngineOptions, SamplingParams

    load_tokenizer(model_dir)  # the tokenizer's own memory belongs to the baseline
    baseline = psutil.Process().memory_info().rss
    engine = Engine.load(model_dir, EngineOptions(cache_mb=cache_mb, memory_limit_mb=limit_mb), measure_disk=False)
    prompt = list(range(1000, 1064))

    def mlx_peak() -> int:
        return mlx_memory().peak_bytes

    events = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens)))
    out = {
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
        "dense_bytes": engine.plan.dense_bytes,
        "expert_bytes_total": engine.plan.expert_bytes_total,
        "cache_bytes": engine.expert_counters()["expert_cache_bytes"],
        "tokens": len(events),
        "cache_hits": engine.expert_counters()["cache_hits"],
        "cache_misses": engine.expert_counters()["cache_misses"],
        "plan_cache_bytes": engine.plan.cache_budget_bytes,
        "cache_mode": engine.plan.cache_mode,
        "footprint_bytes": engine.plan.footprint_bytes,
        "mlx_peak_bytes": mlx_peak(),
        "bytes_read": events[-1].stats.to_dict()["bytes_read"],
    }
    engine.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
