"""Exactness after long prompts on the default device (the lent GPU), against mlx-lm.

For qwen3_moe, qwen3_next and qwen3_5_moe (random models at the self-check's preset: tiny on the
CPU, kernel-check on a GPU, whose kernels gave NaN at the tiny widths) and, with ``--model``, a larger
one (the qwen3.5-397b-shape bench model): greedy tokens after a prompt longer than mlx-lm's
2,048-token prefill step, streamed in one layer-major pass, equal mlx-lm's own generation with
the model in memory, in fp32 and bf16 activations, with no expert cache and with a cache that
holds every expert (pools split into stacked arrays under engine.model.array_limits' limit),
with ``--prefill-matmul`` auto (mlx-lm's gather) and on (on a GPU: one quantized matmul per
expert run; on the CPU: dequantize + dense GEMM).

Writes ``--json`` and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

FAMILIES = ("qwen3_moe", "qwen3_next", "qwen3_5_moe")


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, 50_000, size=n)]


def mlx_lm_tokens(path: Path, prompt: list[int], n: int, dtype: str) -> list[int]:
    """mlx-lm's greedy tokens with the model in memory, activations in ``dtype``."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(path))[:2]
    model.set_dtype(mx.float32 if dtype == "float32" else mx.bfloat16)
    out = [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0))]
    del model
    mx.clear_cache()
    return out


def streamed(path: Path, prompt: list[int], n: int, dtype: str, cache: str, prefill_matmul: str = "auto") -> dict[str, Any]:
    """The engine's greedy tokens and figures, with no cache or every expert cached.

    ``prefill_matmul`` "on" on a GPU: each expert's routed rows in one quantized matmul
    (engine.model.loader.expert_runs_prefill); "auto" there: mlx-lm's per-pair gather.
    """
    from engine.engine import Engine
    from engine.model.memory_budget import every_expert_cache_mb
    from engine.types import EngineOptions, SamplingParams

    opts = {"activation_dtype": dtype, "prefill_matmul": prefill_matmul}
    engine = Engine.load(path, EngineOptions(cache_mb=0, **opts), measure_disk=False)  # type: ignore[arg-type]
    total = engine._loaded.expert_bytes_total
    if cache == "all":
        engine.close()
        engine = Engine.load(path, EngineOptions(cache_mb=every_expert_cache_mb(total), **opts), measure_disk=False)  # type: ignore[arg-type]
        engine.preload_experts()
    try:
        t0 = time.perf_counter()
        events = list(engine.generate(prompt, SamplingParams(max_tokens=n)))
        s = events[-1].stats
        caches = engine._loaded.streamer.caches
        return {
            "tokens": [e.token for e in events],
            "ttft_s": s.ttft_s,
            "elapsed_s": time.perf_counter() - t0,
            "pass_tokens": engine.prefill_pass_tokens,
            "prefill_bytes": s.prefill.bytes_read,
            "pools": len(caches),
            "expert_run_matmuls": engine._loaded.streamer.prefill_matmul.dense_gemms,
            "largest_array_bytes": max(a.nbytes for c in caches for a in c.pool.arrays.values()),
        }
    finally:
        engine.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2_100)
    ap.add_argument("--new", type=int, default=8)
    ap.add_argument("--model", action="append", default=[], help="also check this model directory")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--caches", default="zero,all")
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    ap.add_argument("--prefill-matmul", default="auto,on", help="engine option values to check, comma-separated")
    ap.add_argument("--json", default=None)
    ap.add_argument("--preset", default="", help="the three families' preset (default: the self-check's for the device)")
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    from engine.demo.demo_model import build_random_moe_model
    from engine.diagnostics.selfcheck import check_preset

    preset = args.preset or check_preset(on_cpu=args.device == "cpu")

    prompt = _prompt(args.tokens)
    results: list[dict[str, Any]] = []
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        paths = [(f, build_random_moe_model(Path(tmp) / f, f, 4, preset=preset)) for f in FAMILIES]
        paths += [(Path(m).name, Path(m)) for m in args.model]
        for name, path in paths:
            for dtype in args.dtypes.split(","):
                try:
                    ref = mlx_lm_tokens(path, prompt, args.new, dtype)
                except Exception as e:  # e.g. out of memory for a large model: a result, not a crash
                    results.append({"model": name, "dtype": dtype, "error": f"mlx-lm: {e!r}"})
                    ok = False
                    continue
                for cache in args.caches.split(","):
                    for pm in args.prefill_matmul.split(","):
                        try:
                            r = streamed(path, prompt, args.new, dtype, cache, pm)
                        except Exception as e:
                            r = {"error": repr(e), "tokens": None}
                        same = r.get("tokens") == ref
                        ok &= same
                        r.update(model=name, dtype=dtype, cache=cache, prefill_matmul=pm, same_tokens=same, reference=ref)
                        results.append(r)
                        detail = r["error"] if "error" in r else (
                            f"TTFT {r['ttft_s']:.2f} s, {r['pools']} pool(s), {r['expert_run_matmuls']} expert-run matmuls")
                        print(f"{name:28s} {dtype:8s} cache {cache:4s} prefill_matmul {pm:4s}: same tokens {same}  {detail}",
                              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"prompt_tokens": args.tokens, "ok": ok, "results": results}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
