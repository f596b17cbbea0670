"""``moebar-engine bench``: the engine against the disk and against mlx-lm, side by side in one run.

Phases, in this order so that the peak RSS of the streamed phases is not inflated by mlx-lm:
1. the disk: cold parallel preads at the engine's thread count, of expert-sized blocks and of the
   engine's read pieces, the better of the two (sampled again beside each cold decode run in
   phase 3; the median is the raw figure);
2. the streamed engine alone (cache 0, page cache bypassed): a decode, then chunked prefill
   against token-by-token prefill, then its peak RSS against the engine's own memory plan
   (runtime, dense, KV, working slots, prefill, margin);
3. decode side by side, run by run: cold, cold with one read per expert (no pieces), cold with
   next-layer prefetch, warm (every expert preloaded into the cache, so layers route on the
   device), warm through the host-sync path,
   and mlx-lm's own generation with the model in memory; medians compared;
4. the ``plan`` prediction against what was measured.
Ratios, not absolute times, are the results: shared machines are noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from engine.demo.demo_model import PRESET_MODEL_TYPES
from engine.diagnostics.bench_long_prompt import format_long_prompt, run_long_prompt
from engine.diagnostics.bench_report import format_table, targets
from engine.diagnostics.cache_sweep import format_sweep, parse_fractions, run_cache_sweep
from engine.diagnostics.cgroup_sweep import format_cgroup_sweep, run_cgroup_sweep
from engine.model.memory_budget import every_expert_cache_mb
from engine.platform.cgroup import memory_cgroup_root
from engine.platform.page_cache import eviction_method
from engine.types import EngineOptions


def _model_dir(args: argparse.Namespace) -> Path:
    """Reuse ``--model`` or build the synthetic preset once under the work dir (in a subprocess)."""
    if args.model:
        return Path(args.model).expanduser().resolve()
    layers = f"-L{args.layers}" if args.layers else ""
    experts = getattr(args, "experts", None)
    out = Path(args.work_dir).expanduser() / f"{args.preset}{layers}{f'-E{experts}' if experts else ''}"
    if not (out / "config.json").is_file():
        # --experts draws the experts as random codes (quantizing fp32 draws of hundreds of experts is slow)
        extra = f", config_overrides={{'num_experts': {experts}}}, fast_experts=True" if experts else ""
        code = (
            "import sys; from engine.demo.demo_model import build_random_moe_model as b; "
            f"b({str(out)!r}, {PRESET_MODEL_TYPES.get(args.preset, 'qwen3_moe')!r}, 4, preset={args.preset!r}, "
            f"num_layers={args.layers!r}, overwrite=True{extra})"
        )
        print(f"building synthetic model {args.preset} in {out} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-c", code], check=True)
    return out


def _ensure_packed(model: Path, layout: str) -> None:
    """Pack once, in a subprocess (its buffers must not count in this process's peak RSS)."""
    from engine.model.loader import inspect_experts
    from engine.storage.packed_layout import open_packed_layout

    if layout == "packed" and open_packed_layout(model, inspect_experts(model).layers) is None:
        print("packing experts (one-time) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "engine.cli", "pack", "--quiet", str(model)], check=True)


def _decode(engine: Any, prompt: list[int], tokens: int) -> dict[str, Any]:
    """One greedy run; its decode rate from the times the tokens reached this caller (decode_rate),
    as mlx-lm's side of the bench is timed, and the engine's own figure beside it."""
    from engine.types import SamplingParams

    events, stamps = [], []
    for event in engine.generate(prompt, SamplingParams(max_tokens=tokens)):
        stamps.append(time.perf_counter())
        events.append(event)
    s = events[-1].stats
    d = s.decode
    n = max(1, d.tokens)
    return {
        "tokens": [e.token for e in events],
        "decode_tps": decode_rate(stamps),
        "engine_decode_tps": s.decode_tps,
        "prompt_tps": s.prompt_tps,
        "prompt_s": s.prompt_s,
        "bytes_per_token": d.bytes_read / n,
        "io_wait_per_token_s": d.io_wait_s / n,
        "compute_per_token_s": d.compute_s / n,
        "sync_per_token_s": d.sync_s / n,
        "io_share": d.io_wait_s / d.elapsed_s if d.elapsed_s else 0.0,
        "read_bytes_per_s": d.bytes_read / d.io_wait_s if d.io_wait_s else 0.0,
        "hit_rate": s.cache_hit_rate,
        "prefill_bytes": s.prefill.bytes_read,
    }


def _engine(model: Path, args: argparse.Namespace, measure_disk: bool = False, **opts: Any) -> Any:
    from engine.engine import Engine
    from engine.types import EngineOptions

    opts.setdefault("read_piece_kb", args.read_piece_kb)
    # KV room for what the bench runs (the memory plan the peak RSS is held to), not 8,192 tokens
    opts.setdefault("context_tokens", max(args.prompt_tokens, args.long_prompt or 0, 16) + args.decode_tokens + 16)
    options = EngineOptions(
        io_threads=args.io_threads, device=args.device, use_packed=args.layout == "packed",
        prefill_matmul=args.prefill_matmul, cache_policy=args.cache_policy, gather_slots=args.gather_slots, **opts,
    )  # fmt: skip
    return Engine.load(model, options, measure_disk=measure_disk)


def _pieces_run_bytes(args: argparse.Namespace) -> int:
    """The piece size of the cold runs in pieces: the setting, or 1 MiB (the other cold runs read
    whole experts, so --read-piece-kb 0 still compares against pieces)."""
    from engine.storage.expert_store import READ_PIECE_BYTES

    return args.read_piece_kb * 1024 if args.read_piece_kb else READ_PIECE_BYTES


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    """Run every phase and return the results as a JSON-ready dict."""
    import random

    from engine.engine import measure_expert_read_speed
    from engine.fast_blas import fast_blas_status
    from engine.model.loader import inspect_experts
    from engine.platform_info import measure_cold_read_speed, peak_rss_bytes, process_rss_bytes

    cold_piece = _pieces_run_bytes(args)
    model = _model_dir(args)
    _ensure_packed(model, args.layout)
    baseline_rss = process_rss_bytes()
    layers = inspect_experts(model).layers
    expert_bytes = layers[0].expert_bytes
    expert_total = sum(l.expert_bytes * l.num_experts for l in layers)
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 100_000) for _ in range(16)]
    out: dict[str, Any] = {
        "model": str(model),
        "preset": args.preset if not args.model else None,
        "layers": len(layers),
        "experts": layers[0].num_experts,
        "expert_bytes": expert_bytes,
        "expert_bytes_total": expert_total,
        "layout": args.layout,
        "io_threads": args.io_threads,
        "read_piece_kb": cold_piece // 1024,  # of the cold runs in pieces (the warm one reads through the page cache)
        "decode_tokens": args.decode_tokens,
        "blas": fast_blas_status()[1],
        "prefill_matmul": args.prefill_matmul,
        "gather_slots": args.gather_slots,
        "eviction_method": eviction_method(),  # how cold runs keep the page cache out
    }

    # 1. the disk on its own
    _say("1/4 raw disk reads")
    files = model / "moebar-packed" if args.layout == "packed" else model

    blocks = sorted({expert_bytes, cold_piece} if 0 < cold_piece < expert_bytes else {expert_bytes})
    out["raw_block_bytes"] = blocks

    def sample_disk() -> float:
        """The disk's rate: the better of blocks of an expert and of the engine's read pieces."""
        return max(measure_cold_read_speed(files, block_bytes=b, threads=args.io_threads,
                                           total_bytes=min(expert_total, args.disk_bytes)) for b in blocks)  # fmt: skip

    disk_samples = [sample_disk()]
    if args.long_prompt:  # the long-prompt mode: TTFT against the one-pass bound, nothing else
        _say(f"2/2 long prompt of {args.long_prompt} tokens")
        out["long_prompt"] = run_long_prompt(
            args.long_prompt, args.prefill_chunk, lambda **o: _engine(model, args, **o), sample_disk, expert_total,
            compute=args.long_prompt_compute, repeats=min(args.repeats, 2),
        )
        out["disk"] = {"raw_parallel_read_bytes_per_s": out["long_prompt"]["raw_disk_bytes_per_s"]}
        return out

    # 2. streamed phases alone (their peak RSS is checked): cold decode, then prefill both ways
    _say("2/4 cold decode and prefill")
    # loaded as cold mode is: with no --read-piece-kb it measures both ways and keeps the faster
    cold = _engine(model, args, measure_disk=args.read_piece_kb is None, cache_mb=0, cold=True)
    plan = cold.plan
    choice = cold.read_choice
    out["read_choice"] = {
        "measured_at_load": choice is not None,
        "whole_bytes_per_s": choice.whole_bytes_per_s if choice else None,
        "pieces_bytes_per_s": choice.pieces_bytes_per_s if choice else None,
        "piece_bytes": cold._loaded.store.piece_bytes,  # what the engine reads cold in (0: whole experts)
    }
    if args.trace:
        cold.start_trace(args.trace)  # the routing of the cold decode run (diagnostics.traces)
    _decode(cold, prompt, args.decode_tokens)
    cold.stop_trace()
    long_prompt = [rng.randrange(1000, 100_000) for _ in range(args.prompt_tokens)]
    prefill: dict[str, Any] = {"prompt_tokens": args.prompt_tokens}
    for name, chunk in (("chunked", args.prefill_chunk), ("token_by_token", 1)):
        cold.options.prefill_chunk = chunk
        if cold.layer_major_prefill:  # passes over the experts of this many tokens
            cold.prefill_pass_tokens = chunk
        r = _decode(cold, long_prompt, 1)
        prefill[name] = {"prompt_tps": r["prompt_tps"], "prompt_s": r["prompt_s"], "bytes_read": r["prefill_bytes"]}
    cold.options.prefill_chunk = args.prefill_chunk
    cold.prefill_pass_tokens = cold._pass_tokens()
    out["prefill"] = prefill
    # The limit is the engine's own plan for this load (cache 0): what it set aside for the dense
    # weights, the KV of its context, the working slots, a prefill pass and its margin.
    needs = cold._loaded.budget.needs
    planned = needs.dense_bytes + needs.kv_bytes + needs.working_bytes + needs.prefill_bytes + needs.margin_bytes
    start_rss = max(baseline_rss, needs.runtime_bytes)  # (before MLX was imported it is smaller than the plan's)
    out["memory"] = {
        "baseline_rss": baseline_rss,
        "peak_rss": peak_rss_bytes(),
        "dense_bytes": plan.dense_bytes,
        "budget_bytes": 0,
        "limit_bytes": start_rss + planned,
        "planned_bytes": {"runtime": start_rss, "dense": needs.dense_bytes, "kv": needs.kv_bytes, "working_slots": needs.working_bytes,
                          "prefill": needs.prefill_bytes, "margin": needs.margin_bytes},
        **_mlx_figures(),  # MLX's allocator after the streamed phases (held by the memory budget)
    }

    # 3. decode side by side, run by run: cold, cold + prefetch, warm (all cached), mlx-lm in RAM
    _say("3/4 decode side by side")
    out.update(_decode_side_by_side(model, args, prompt, expert_total, cold, lambda: disk_samples.append(sample_disk())))
    # A disk's rate drifts during a run (1.12-1.53 GB/s within one on the GPU machine): the raw
    # figure is the median of a sample before the phases and one beside each cold decode run.
    out["disk"] = {"raw_parallel_read_bytes_per_s": statistics.median(disk_samples), "samples_bytes_per_s": disk_samples}
    cold.close()

    # 4. the plan's prediction
    _say("4/4 plan")
    plan_disk = measure_expert_read_speed(layers, io_threads=args.io_threads, samples=32, piece_bytes=cold_piece)
    per_token = len(layers) * plan.experts_per_token * expert_bytes
    out["plan"] = {
        "disk_read_bytes_per_s": plan_disk,
        "expert_bytes_per_token": per_token,
        "tps_bound_cold": plan_disk / per_token if per_token else None,
        "measured_cold_tps": out["cold"]["decode_tps"],
    }
    out["targets"] = targets(out)
    return out


def _decode_side_by_side(
    model: Path, args: argparse.Namespace, prompt: list[int], expert_total: int, cold: Any,
    sample_disk: Callable[[], None],
) -> dict[str, Any]:
    """Interleave the decode runs so that machine noise hits each the same; report medians."""
    import mlx.core as mx
    from mlx_lm import load as mlx_load
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    ref_model, tok = mlx_load(str(model))[:2]
    if not _has_gpu():
        ref_model.set_dtype(mx.float32)  # the same activation dtype the engine uses on CPU
    mx.eval(ref_model.parameters())
    prefetch = _engine(model, args, cache_mb=0, cold=True, prefetch=True)
    warm = _engine(model, args, cache_mb=every_expert_cache_mb(expert_total))
    chosen = cold._loaded.store.piece_bytes  # the engine's own way (the "cold" figures are that run's)
    cold_piece = _pieces_run_bytes(args)
    runs: dict[str, list[dict[str, Any]]] = {"cold_pieces": [], "cold_whole_reads": [], "cold_prefetch": [], "warm": [],
                                             "warm_host_sync": []}
    ref_tps: list[float] = []
    same = True
    try:
        preloaded = warm.preload_experts()  # every expert cached
        _decode(warm, prompt, args.decode_tokens)  # first use of the slots, kernels compiled
        for _ in range(args.repeats):
            sample_disk()  # the raw rate, right beside the cold runs
            for name, engine in (("cold_pieces", cold), ("cold_whole_reads", cold), ("cold_prefetch", prefetch), ("warm", warm)):
                # the cold engine both ways, in pieces and one read per expert (the same dense weights)
                cold._loaded.store.piece_bytes = 0 if name == "cold_whole_reads" else cold_piece
                runs[name].append(_decode(engine, prompt, args.decode_tokens))
            cold._loaded.store.piece_bytes = chosen
            warm.set_device_routing(False)  # the same cache, one host sync per layer
            runs["warm_host_sync"].append(_decode(warm, prompt, args.decode_tokens))
            warm.set_device_routing(True)
            ref_tokens, stamps = [], []
            for r in stream_generate(ref_model, tok, prompt, max_tokens=args.decode_tokens, sampler=make_sampler(0.0)):
                ref_tokens.append(r.token)
                stamps.append(time.perf_counter())
            ref_tps.append(decode_rate(stamps))
            same = same and all(runs[n][-1]["tokens"] == ref_tokens for n in runs)
        prefetched = prefetch.expert_counters()["prefetched_hits"]
        device_routed = warm.expert_counters()["device_routed_calls"]
    finally:
        prefetch.close()
        warm.close()
    out: dict[str, Any] = {name: _median_run(rs) for name, rs in runs.items()}
    out["cold"] = dict(out["cold_whole_reads"] if chosen == 0 else out["cold_pieces"])  # the engine's way
    out["cold_prefetch"]["prefetched_hits"] = prefetched
    ours = [r["decode_tps"] for r in runs["warm"]]
    out["warm"].update(
        streamed_tps=ours,
        mlx_lm_tps=ref_tps,
        ratio=statistics.median(ours) / statistics.median(ref_tps) if min(ref_tps) > 0 else 0.0,
        same_tokens=same,
        preloaded_bytes=preloaded,
        device_routed_calls=device_routed,
    )
    synced = [r["decode_tps"] for r in runs["warm_host_sync"]]
    out["warm_host_sync"]["ratio"] = statistics.median(synced) / statistics.median(ref_tps) if min(ref_tps) > 0 else 0.0
    return out


def decode_rate(stamps: list[float]) -> float:
    """Tokens per second after the first token, from the times each token reached the caller.

    Both sides of the bench are timed so (the engine's events, mlx-lm's ``stream_generate``
    responses). The engine's own ``decode_tps`` starts its clock when the first token is ready,
    before the step after it is queued; a caller gets that token only once the step is queued,
    as with mlx-lm, so at 12 tokens the engine's figure read 3-7% below this one (CPU, 2026-12-06),
    which made the warm ratio unfair to the engine. (mlx-lm's own ``generation_tps`` divides all N
    tokens by the time after the first, which overstates it by N/(N-1): 14% at 8 tokens.)
    """
    if len(stamps) < 2 or stamps[-1] <= stamps[0]:
        return 0.0
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Field-wise median of several decode runs (tokens from the first)."""
    out: dict[str, Any] = {"tokens": runs[0]["tokens"], "runs": len(runs)}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def _mlx_figures() -> dict[str, int]:
    """MLX's active, cached and peak memory now."""
    from engine.model.mlx_memory import mlx_memory

    m = mlx_memory()
    return {"mlx_active_bytes": m.active_bytes, "mlx_cached_bytes": m.cached_bytes, "mlx_peak_bytes": m.peak_bytes}


def _say(phase: str) -> None:
    """Progress on stderr (the table comes at the end)."""
    print(f"bench: {phase} ...", file=sys.stderr, flush=True)


def _has_gpu() -> bool:
    import mlx.core as mx

    try:
        return bool(mx.default_device() == mx.gpu)
    except Exception:
        return False


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``moebar-engine bench``."""
    from engine.cli import kib_or_zero

    p = argparse.ArgumentParser(prog="moebar-engine bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="mini", choices=["mini", "small", "qwen3-30b-shape", "qwen3.5-397b-shape", "tiny"],
                   help="shape of the random-weight model built for the run (default mini)")
    p.add_argument("--layers", type=int, default=None, help="number of layers (to fit the disk)")
    p.add_argument("--experts", type=int, default=None,
                   help="experts per layer of the preset (drawn as random quantized codes; default the preset's)")
    p.add_argument("--model", default=None, help="benchmark this model directory instead of a preset")
    p.add_argument("--work-dir", default=str(Path.home() / ".cache" / "moebar-bench"),
                   help="where the preset model is built and kept between runs")
    p.add_argument("--layout", choices=["packed", "safetensors"], default="packed",
                   help="read experts from the packed file or the safetensors (default packed)")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens generated per decode run")
    p.add_argument("--prompt-tokens", type=int, default=512, help="prompt length of the prefill phases")
    p.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens routed together")
    p.add_argument("--repeats", type=int, default=3, help="runs per phase (the median is reported)")
    p.add_argument("--io-threads", type=int, default=4, help="parallel expert reads")
    p.add_argument("--read-piece-kb", type=kib_or_zero, default=None,
                   help="KiB per read of an expert's piece for the cold engine (0: whole experts; default: "
                        "it measures both at load, as cold mode does); cold decode in 1024 KiB pieces (or "
                        "these) and in whole-expert reads run side by side")
    p.add_argument("--disk-bytes", type=int, default=512 * 2**20, help="bytes read by the raw disk test")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the model computes (auto: the GPU when MLX has one)")
    p.add_argument("--prefill-matmul", choices=["auto", "on", "off"], default="auto",
                   help="long prefill calls: on the CPU, dequantize + dense GEMM (auto: where MLX has a fast BLAS); "
                        "on a GPU, 'on' runs each expert's routed rows as one quantized matmul (auto: off there)")
    p.add_argument("--gather-slots", choices=["auto", "on", "off"], default=EngineOptions.gather_slots,
                   help="streaming layers copy a call's experts (at most 2K) into one compact array first (see "
                        "moebar-engine generate --help)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--long-prompt", type=int, default=0, metavar="TOKENS",
                   help="instead of the phases: time to first token of a prompt this long, cold, cache 0, in one "
                        "pass and in passes of --prefill-chunk tokens, against the one-pass bound")
    p.add_argument("--long-prompt-compute", choices=["warm", "none"], default="warm",
                   help="the bound's compute: the same prompt with every expert resident (warm), or none")
    p.add_argument("--cache-policy", default=EngineOptions.cache_policy,
                   help=f"expert cache policy (default {EngineOptions.cache_policy}; see moebar-engine generate --help)")
    p.add_argument("--trace", default=None, metavar="FILE", help="record the cold decode run's routing here")
    p.add_argument("--cache-sweep", type=parse_fractions, default=None, metavar="FRACTIONS",
                   help="instead of the phases: decode at these expert-cache sizes (fractions of all "
                        "experts, e.g. 0,0.125,0.5,1), page cache warm and cold (see cache_sweep); with "
                        "--cgroup-limit-mb: shares of the spare RAM under the limit (see cgroup_sweep)")
    p.add_argument("--cgroup-limit-mb", type=float, default=None, metavar="MIB",
                   help="with --cache-sweep (Linux, root): run each row in a memory cgroup of this size, page "
                        "cache included, with --memory-limit-mb set to it")
    p.add_argument("--context-tokens", type=int, default=8192, help="cgroup sweep: the context the memory budget keeps KV room for")
    p.add_argument("--warmup-tokens", type=int, default=64, help="cgroup sweep: tokens generated before measuring")
    p.add_argument("--temperature", type=float, default=1.0, help="cgroup sweep: sampling temperature (seeded)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write the JSON."""
    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    if args.cache_sweep is not None:
        # fails with the reason (not Linux, no cgroup v1 memory controller, not root) before any build
        cgroup_root = memory_cgroup_root() if args.cgroup_limit_mb is not None else None
        model = _model_dir(args)
        _ensure_packed(model, args.layout)
        if cgroup_root is not None:
            results = run_cgroup_sweep(args, model, args.cache_sweep, root=cgroup_root)
            table = format_cgroup_sweep(results)
        else:
            results = run_cache_sweep(args, model, args.cache_sweep)
            table = format_sweep(results)
    else:
        results = run_bench(args)
        table = format_long_prompt(results["long_prompt"]) if "long_prompt" in results else format_table(results)
    results["bench_seconds"] = time.perf_counter() - t0
    results["command"] = "moebar-engine bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
