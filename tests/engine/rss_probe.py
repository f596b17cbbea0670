"""Run in a fresh process: load a model streamed, generate, print RSS figures as JSON."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import psutil


def main() -> None:
    """argv: model_dir cache_mb max_tokens."""
    model_dir, cache_mb, max_tokens = Path(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    import mlx.core as mx  # noqa: F401
    from mlx_lm.utils import load_tokenizer

    from engine.engine import Engine
    from engine.platform_info import peak_rss_bytes
    from engine.types import EngineOptions, SamplingParams

    load_tokenizer(model_dir)  # the tokenizer's own memory belongs to the baseline
    baseline = psutil.Process().memory_info().rss
    engine = Engine.load(model_dir, EngineOptions(cache_mb=cache_mb), measure_disk=False)
    prompt = list(range(1000, 1064))
    events = list(engine.generate(prompt, SamplingParams(max_tokens=max_tokens)))
    out = {
        "baseline_rss": baseline,
        "peak_rss": peak_rss_bytes(),
        "dense_bytes": engine.plan.dense_bytes,
        "expert_bytes_total": engine.plan.expert_bytes_total,
        "cache_bytes": engine.expert_counters()["expert_cache_bytes"],
        "tokens": len(events),
        "bytes_read": events[-1].stats.to_dict()["bytes_read"],
    }
    engine.close()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
