"""Why a warm engine (every expert cached) may not route on the device: pools, preload, routing.

Builds (or takes ``--model``) a model, loads the engine with a cache larger than its experts,
preloads, and prints each pool's slots and whether it holds all its layers, the bytes preloaded,
each layer's device table, and two decodes' tok/s and device-routed calls, beside mlx-lm's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="")
    p.add_argument("--preset", default="kernel-check")
    p.add_argument("--device", default="gpu")
    p.add_argument("--tokens", type=int, default=24)
    args = p.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from engine.demo.demo_model import build_random_moe_model
    from engine.engine import Engine
    from engine.model.loader import inspect_experts
    from engine.model.memory_budget import every_expert_cache_mb
    from engine.types import EngineOptions, SamplingParams

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else build_random_moe_model(Path(tmp) / "m", "qwen3_moe", 4, preset=args.preset)
        total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(model).layers)
        engine = Engine.load(model, EngineOptions(cache_mb=every_expert_cache_mb(total)), measure_disk=False)
        s = engine._loaded.streamer
        out: dict = {"budget": str(engine._loaded.budget) if hasattr(engine._loaded, "budget") else None}
        out["pools"] = [(c.pool.n_slots, c.holds_all, sorted(c.layer_experts)) for c in s.caches]
        out["preloaded"] = engine.preload_experts()
        out["tables"] = [s.device_table(i) is not None for i in range(len(s.cache_of_layer))]
        out["device_routing"] = s.device_routing
        prompt = list(range(100, 140))
        for run in range(2):
            t0 = time.perf_counter()
            ev = list(engine.generate(prompt, SamplingParams(max_tokens=args.tokens)))
            st = ev[-1].stats
            out[f"run{run}"] = {"s": time.perf_counter() - t0, "decode_tps": getattr(st, "decode_tps", None),
                                "counters": engine.expert_counters()}
        engine.close()
        ref, tok = load(str(model))[:2]
        stamps = []
        for _ in stream_generate(ref, tok, prompt, max_tokens=args.tokens, sampler=make_sampler(0.0)):
            stamps.append(time.perf_counter())
        out["mlx_lm_decode_tps"] = (len(stamps) - 2) / (stamps[-1] - stamps[1]) if len(stamps) > 2 else None
    print(json.dumps(out, default=str, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
