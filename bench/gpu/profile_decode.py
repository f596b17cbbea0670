"""Where a warm decode token's time goes: the engine (every expert resident) against mlx-lm.

Both run the same model on the same device, interleaved, greedy, with tokens per second counted
the same way (tokens after the first / time after the first). Then, per token: the host time
spent building the lazy graph (Python) against the whole step (build + evaluation), and a
cProfile of each decode loop (top functions by own time). Writes JSON and a text report.

With ``--cold``: a cold engine instead (no expert cache, reads past the page cache): where a
cold token's time goes (expert I/O wait, routing syncs, the rest), and a cProfile of its decode
loop, where the time MLX's ``eval`` waits for the device shows apart from Python's graph building;
one engine per ``--gather-slots`` setting, interleaved, with their tokens compared.

Usage: python bench/gpu/profile_decode.py --model DIR [--device gpu] [--tokens 64] [--cold [--gather-slots off,on]] --out DIR
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import engine  # noqa: F401  (before mlx: the fast BLAS, see engine.fast_blas)
import mlx.core as mx
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from engine.diagnostics.bench import decode_rate
from engine.engine import Engine
from engine.types import EngineOptions, SamplingParams


def _graph_build(model: Any, cache: list[Any], steps: int) -> tuple[float, float]:
    """Median host time to build one token's graph, and median time to build and evaluate it."""
    mx.eval(model(mx.array([[1, 2, 3, 4]]), cache=cache))
    builds, totals = [], []
    for _ in range(steps):
        t0 = time.perf_counter()
        y = mx.argmax(model(mx.array([[1000]]), cache=cache)[:, -1, :], axis=-1)
        t1 = time.perf_counter()
        mx.eval(y)
        t2 = time.perf_counter()
        builds.append(t1 - t0)
        totals.append(t2 - t0)
    return statistics.median(builds), statistics.median(totals)


def _profiled(fn: Callable[[], Any], top: int = 18) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cold", action="store_true", help="profile a cold engine (cache 0, reads past the page cache)")
    p.add_argument("--io-threads", type=int, default=8)
    p.add_argument("--read-piece-kb", type=int, default=None, help="cold: KiB per read piece (0: whole experts)")
    p.add_argument("--gather-slots", default="off,on",
                   help="cold: the engines' gather_slots settings, compared side by side (comma-separated; "
                        "SETTING-staged: O_DIRECT reads through the staging buffer, not straight into the slots)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.cold:
        return profile_cold(args, out)

    eng = Engine.load(args.model, EngineOptions(cache_mb=1e7, device=args.device), measure_disk=False)
    eng.preload_experts()
    ref, tok = mlx_load(args.model)
    if mx.default_device() == mx.cpu:
        ref.set_dtype(mx.float32)
    mx.eval(ref.parameters())
    prompt = tok.encode("The expert streaming engine reads only the routed experts")

    def ours() -> tuple[float, list[int]]:
        stamps, toks = [], []
        for ev in eng.generate(prompt, SamplingParams(max_tokens=args.tokens)):
            stamps.append(time.perf_counter())
            toks.append(ev.token)
        return decode_rate(stamps), toks

    def theirs() -> tuple[float, list[int]]:
        stamps, toks = [], []
        for r in stream_generate(ref, tok, prompt, max_tokens=args.tokens, sampler=make_sampler(0.0)):
            stamps.append(time.perf_counter())
            toks.append(r.token)
        return decode_rate(stamps), toks

    ours(), theirs()  # first use: kernels compiled, buffers allocated
    runs: dict[str, list[float]] = {"engine": [], "mlx_lm": []}
    same = True
    for _ in range(args.repeats):
        a, ta = ours()
        b, tb = theirs()
        runs["engine"].append(a)
        runs["mlx_lm"].append(b)
        same = same and ta == tb
    result: dict[str, Any] = {
        "device": str(mx.default_device()),
        "tokens": args.tokens,
        "engine_tps": runs["engine"],
        "mlx_lm_tps": runs["mlx_lm"],
        "ratio": statistics.median(runs["engine"]) / statistics.median(runs["mlx_lm"]),
        "same_tokens": same,
    }
    for name, model, cache in (("engine", eng.model, eng.make_kv_cache()), ("mlx_lm", ref, make_prompt_cache(ref))):
        build, total = _graph_build(model, cache, 32)
        result[f"{name}_graph_build_ms"] = 1e3 * build
        result[f"{name}_step_ms"] = 1e3 * total
    (out / "profile_decode.json").write_text(json.dumps(result, indent=2))
    report = [json.dumps(result, indent=2), "", "== engine decode loop ==", _profiled(ours),
              "== mlx-lm decode loop ==", _profiled(theirs)]  # fmt: skip
    (out / "profile_decode.txt").write_text("\n".join(report))
    print("\n".join(report[:1]))
    eng.close()
    return 0


def profile_cold(args: argparse.Namespace, out: Path) -> int:
    """Cold engines' decode (one per ``--gather-slots`` setting): per-token figures of two
    interleaved runs each and whether their tokens agree, then a cProfile of the last one's third."""
    settings = args.gather_slots.split(",")
    engines = {}
    for g in settings:  # "SETTING" or "SETTING-staged": O_DIRECT reads through the staging buffer only
        engines[g] = Engine.load(args.model, EngineOptions(cache_mb=0, cold=True, io_threads=args.io_threads, device=args.device,
                                                           read_piece_kb=args.read_piece_kb, gather_slots=g.split("-")[0]),
                                 measure_disk=False)  # fmt: skip
        engines[g]._loaded.store.direct_into_dests = not g.endswith("-staged")
    prompt = list(range(1000, 1016))
    tokens: dict[str, list[int]] = {}

    def run(g: str) -> dict[str, Any]:
        stamps, ids = [], []
        stats = None
        for ev in engines[g].generate(prompt, SamplingParams(max_tokens=args.tokens)):
            stamps.append(time.perf_counter())
            ids.append(ev.token)
            stats = ev.stats
        assert stats is not None
        tokens.setdefault(g, ids)
        d, n = stats.decode, max(1, stats.decode.tokens)
        return {
            "gather_slots": g,
            "direct_into_slots": engines[g]._loaded.store.direct_into_dests,
            "decode_tps": decode_rate(stamps),
            "ms_per_token": {k: 1e3 * getattr(d, k) / n for k in ("io_wait_s", "sync_s", "compute_s", "elapsed_s")},
            "read_gbps": d.bytes_read / d.io_wait_s / 1e9 if d.io_wait_s else 0.0,
            "mb_per_token": d.bytes_read / n / 1e6,
        }

    runs = [run(g) for _ in range(2) for g in settings]
    first = tokens[settings[0]]
    result = {"device": str(mx.default_device()), "tokens": args.tokens, "cold_runs": runs,
              "read_piece_kb": args.read_piece_kb,
              "same_tokens": {g: ids == first for g, ids in tokens.items()}}  # fmt: skip
    profile = _profiled(lambda: run(settings[-1]), top=30)
    (out / "profile_cold.json").write_text(json.dumps(result, indent=2))
    (out / "profile_cold.txt").write_text(json.dumps(result, indent=2) + "\n\n== cold decode loop ==\n" + profile)
    print(json.dumps(result, indent=2))
    print(profile)
    for eng in engines.values():
        eng.close()
    return 0 if all(result["same_tokens"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
