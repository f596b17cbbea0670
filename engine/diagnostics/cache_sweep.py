"""``moebar-engine bench --cache-sweep``: decode speed and hit rate across expert-cache sizes.

For each cache size (a fraction of all experts), one engine decodes the same prompts twice: with
the OS page cache warm (the experts the in-process cache misses come from RAM) and cold (they
come from the disk). The figures say what the in-process cache buys over the page cache, which
is what the memory budget's page-cache reserve is chosen from (engine.model.memory_budget).
Each row also has MLX's active/cached/peak memory and the process's peak RSS.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

DEFAULT_FRACTIONS = (0.0, 0.0625, 0.125, 0.25, 0.5, 1.0)


def parse_fractions(text: str) -> list[float]:
    """"0,0.125,1" -> [0.0, 0.125, 1.0]; each between 0 and 1."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--cache-sweep: expected fractions like 0,0.25,1, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"--cache-sweep: each fraction must be within 0..1, got {text!r}")
    return values


def _decode_row(engine: Any, prompts: list[list[int]], tokens: int) -> dict[str, Any]:
    """Median decode figures over one generation per prompt (each from an empty KV cache).

    Distinct prompts, so that hits come from experts shared between different tokens, not from
    replaying the same generation."""
    import mlx.core as mx

    from engine.model.mlx_memory import mlx_memory
    from engine.types import SamplingParams

    rates, hit_rates, bytes_per_token = [], [], []
    mx.reset_peak_memory()
    for prompt in prompts:
        before = engine.expert_counters()
        events = list(engine.generate(prompt, SamplingParams(max_tokens=tokens)))
        after = engine.expert_counters()
        s = events[-1].stats
        rates.append(s.decode_tps)
        hits = after["cache_hits"] - before["cache_hits"]
        misses = after["cache_misses"] - before["cache_misses"]
        hit_rates.append(hits / (hits + misses) if hits + misses else 0.0)
        bytes_per_token.append(s.decode.bytes_read / max(1, s.decode.tokens))
    mem = mlx_memory()
    return {
        "decode_tps": statistics.median(rates),
        "decode_tps_runs": rates,
        "hit_rate": statistics.median(hit_rates),
        "bytes_per_token": statistics.median(bytes_per_token),
        "mlx_active_bytes": mem.active_bytes,
        "mlx_cached_bytes": mem.cached_bytes,
        "mlx_peak_bytes": mem.peak_bytes,
    }


def run_cache_sweep(args: argparse.Namespace, model: Path, fractions: list[float]) -> dict[str, Any]:
    """Decode at each cache fraction, page cache warm and cold; return the rows."""
    import random

    from engine.engine import Engine
    from engine.model.loader import inspect_experts, slot_bytes_total
    from engine.platform.page_cache import eviction_method
    from engine.platform_info import peak_rss_bytes
    from engine.types import EngineOptions

    layers = inspect_experts(model).layers
    # fractions of what every expert takes in the slots (more than on disk where slots widen scales)
    total = slot_bytes_total(model, EngineOptions(device=args.device))
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 100_000) for _ in range(16)] for _ in range(args.repeats + 1)]
    rows = []
    for fraction in fractions:
        row: dict[str, Any] = {"fraction": fraction, "cache_bytes": int(fraction * total)}
        for mode, cold in (("warm_page_cache", False), ("cold", True)):
            options = EngineOptions(
                cache_mb=fraction * total / 2**20, cold=cold, io_threads=args.io_threads, device=args.device,
                use_packed=args.layout == "packed", prefill_matmul=args.prefill_matmul,
                cache_policy=args.cache_policy,
            )  # fmt: skip
            engine = Engine.load(model, options, measure_disk=False)
            try:
                if not cold:
                    _decode_row(engine, prompts[-1:], 2)  # warms the page cache (and MLX's kernels)
                row[mode] = _decode_row(engine, prompts[: args.repeats], args.decode_tokens)
            finally:
                engine.close()
        row["peak_rss_bytes"] = peak_rss_bytes()
        rows.append(row)
        print(f"bench: cache {100 * fraction:.1f}% of experts: warm {row['warm_page_cache']['decode_tps']:.2f} "
              f"tok/s, cold {row['cold']['decode_tps']:.2f} tok/s, hit rate {row['cold']['hit_rate']:.2f}",
              flush=True)  # fmt: skip
    return {
        "model": str(model),
        "layers": len(layers),
        "experts": layers[0].num_experts,
        "expert_bytes": layers[0].expert_bytes,
        "expert_bytes_total": sum(l.expert_bytes * l.num_experts for l in layers),
        "slot_bytes_total": total,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "eviction_method": eviction_method(),
        "cache_policy": args.cache_policy,
        "rows": rows,
    }


def format_sweep(r: dict[str, Any]) -> str:
    """The sweep as a plain-text table."""
    lines = [
        f"cache sweep: {r['layers']} layers x {r['experts']} experts, {r['expert_bytes_total'] / 2**20:.0f} MiB of "
        f"experts, {r['decode_tokens']} tokens x {r['repeats']} runs; cold = page cache evicted by {r['eviction_method']}",
        f"{'cache':>14} {'hit rate':>9} {'warm tok/s':>11} {'cold tok/s':>11} {'cold MiB/tok':>13} "
        f"{'MLX active':>11} {'MLX cached':>11} {'MLX peak':>9}",
    ]
    for row in r["rows"]:
        w, c = row["warm_page_cache"], row["cold"]
        lines.append(
            f"{100 * row['fraction']:5.1f}% {row['cache_bytes'] / 2**20:6.0f}M {c['hit_rate']:9.2f} "
            f"{w['decode_tps']:11.2f} {c['decode_tps']:11.2f} {c['bytes_per_token'] / 2**20:13.2f} "
            f"{c['mlx_active_bytes'] / 2**20:10.0f}M {c['mlx_cached_bytes'] / 2**20:10.0f}M "
            f"{c['mlx_peak_bytes'] / 2**20:8.0f}M"
        )
    return "\n".join(lines)
