"""Which difference makes the engine's bf16 decode after a 2,100-token prompt leave mlx-lm's
(check_long_prefill saw it for qwen3_moe and qwen3_next, debug_exactness did not): the engine's
prefill_chunk option, and whether mlx-lm runs before or after an engine in the process (an
engine sets MLX's memory and cache limits). No per-layer hooks (no forced evaluation)."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np


def stream_ref(path: Path, prompt: list[int], n: int) -> tuple[list[int], list[np.ndarray]]:
    """mlx-lm's bf16 tokens and logprobs through ``stream_generate`` (as check_long_prefill runs it)."""
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tok = load(str(path))[:2]
    model.set_dtype(mx.bfloat16)
    toks, lps = [], []
    for r in stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0)):
        toks.append(r.token)
        lps.append(np.array(r.logprobs.astype(mx.float32)).reshape(-1))
    del model
    mx.clear_cache()
    return toks, lps


def main() -> int:
    mx.set_default_device(mx.gpu if (sys.argv[1:] or ["gpu"])[0] == "gpu" else mx.cpu)
    sys.path.insert(0, str(Path(__file__).parent))
    from debug_exactness import engine_run

    from engine.demo.demo_model import build_random_moe_model

    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 50_000, size=2_100)]
    n = 12
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        path = build_random_moe_model(Path(tmp) / "m", "qwen3_moe", 4, preset="kernel-check")
        ref = stream_ref(path, prompt, n)
        runs = [
            ("engine chunk 512", lambda: engine_run(path, prompt, n, "bfloat16", cache_mb=0, prefill_chunk=512)),
            ("engine chunk 16", lambda: engine_run(path, prompt, n, "bfloat16", cache_mb=0)),
            ("mlx-lm after engines", lambda: stream_ref(path, prompt, n)),
            ("engine chunk 512 again", lambda: engine_run(path, prompt, n, "bfloat16", cache_mb=0, prefill_chunk=512)),
        ]
        for name, fn in runs:
            r = fn()
            toks, lps = (r["tokens"], [x.reshape(-1) for x in r["logprobs"]]) if isinstance(r, dict) else r
            d = [float(np.max(np.abs(a - b))) for a, b in zip(ref[1], lps)]
            row = {"run": name, "equal": toks == ref[0], "tokens": toks, "ref": ref[0], "max_dlogprob": d}
            print(json.dumps(row), flush=True)
            out.append(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
