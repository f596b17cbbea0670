"""Two cache levels on calibrated routing: the in-process share of the spare RAM at a real model's size.

``bench --cache-sweep ... --cgroup-limit-mb`` measures the split on a real kernel page cache, but
with a random-weight model whose router is more concentrated than a real one's. This replays the
calibrated synthetic routing (engine.diagnostics.synthetic_traces.CALIBRATED: Qwen3.5-397B's 60
layers x 512 experts, K=10) through the two levels a Mac has: the in-process cache (LRU per
layer, an equal share of the slots each, as ``lru-layer``) and, behind it, the page cache (one
LRU over every expert file block, touched only by the in-process cache's misses, as a pread is).
Both are sized from one spare: ``share`` to the first, the rest to the second. Per token it
counts expert bytes from the disk and from the page cache, and projects the Mac's time as the
cgroup sweep does.

    python -m engine.diagnostics.two_level_sim --spare-gb 26.5 --shares 0,0.05,0.15,0.3,0.5,0.75,1
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from dataclasses import replace
from typing import Any

import numpy as np

from engine.diagnostics.cgroup_sweep import COPY_RATES_CHECKED, MAC_COPY_BYTES_PER_S, projected_ms_per_token


def simulate(ids: np.ndarray, capacity_experts: int, share: float, warmup_tokens: int) -> dict[str, float]:
    """Replay ``ids`` ``[tokens, layers, k]``; lookups per token served by each level after the warm-up."""
    tokens, layers, _ = ids.shape
    per_layer = int(share * capacity_experts) // layers
    page_cap = capacity_experts - per_layer * layers
    first: list[OrderedDict[int, None]] = [OrderedDict() for _ in range(layers)]
    page: OrderedDict[tuple[int, int], None] = OrderedDict()
    in_process = page_hits = disk = 0
    for t in range(tokens):
        counted = t >= warmup_tokens
        for layer in range(layers):
            cache = first[layer]
            for e in ids[t, layer].tolist():
                if e in cache:
                    cache.move_to_end(e)
                    in_process += counted
                    continue
                key = (layer, e)
                if key in page:
                    page.move_to_end(key)
                    page_hits += counted
                else:
                    disk += counted
                    page[key] = None
                    if len(page) > page_cap:
                        page.popitem(last=False)
                if per_layer:
                    cache[e] = None
                    if len(cache) > per_layer:
                        cache.popitem(last=False)
    n = max(1, tokens - warmup_tokens)
    lookups = in_process + page_hits + disk
    return {
        "share": share,
        "in_process_experts_per_layer": per_layer,
        "page_cache_experts": page_cap,
        "in_process_hit_rate": in_process / lookups if lookups else 0.0,
        "page_cache_per_token": page_hits / n,
        "disk_per_token": disk / n,
    }


def sweep(spare_bytes: float, shares: list[float], tokens: int, warmup_tokens: int, seed: int = 0) -> dict[str, Any]:
    """Every share on the same calibrated routing; the projected Mac time per token of each."""
    from engine.diagnostics.synthetic_traces import CALIBRATED, routing

    model = replace(CALIBRATED, seed=seed)
    ids = routing(model, tokens + warmup_tokens)
    capacity = int(spare_bytes // model.expert_bytes)
    rows = []
    for share in shares:
        row: dict[str, Any] = simulate(ids, capacity, share, warmup_tokens)
        row["disk_bytes_per_token"] = row["disk_per_token"] * model.expert_bytes
        row["page_cache_bytes_per_token"] = row["page_cache_per_token"] * model.expert_bytes
        row["mac_ms_per_token"] = {f"{r / 1e9:g}": projected_ms_per_token(row["disk_bytes_per_token"],
                                                                          row["page_cache_bytes_per_token"], copy_rate=r)
                                   for r in COPY_RATES_CHECKED}  # fmt: skip
        rows.append(row)
    best = {k: min(rows, key=lambda r: (r["mac_ms_per_token"][k], r["share"]))["share"] for k in rows[0]["mac_ms_per_token"]}
    return {"spare_bytes": spare_bytes, "capacity_experts": capacity, "experts_total": model.moe_layers * model.experts_per_layer,
            "tokens": tokens, "warmup_tokens": warmup_tokens, "lookups_per_token": model.moe_layers * model.experts_per_token,
            "best_share_by_copy_rate": best, "rows": rows}  # fmt: skip


def format_table(r: dict[str, Any]) -> str:
    """The simulated sweep as plain text."""
    default = f"{MAC_COPY_BYTES_PER_S / 1e9:g}"
    lines = [
        f"two-level sim: calibrated routing, 60 x 512 experts, K=10; spare {r['spare_bytes'] / 1e9:.1f} GB = "
        f"{r['capacity_experts']} experts ({100 * r['capacity_experts'] / r['experts_total']:.1f}%); "
        f"{r['tokens']} tokens after {r['warmup_tokens']}",
        f"{'share':>5} {'L1/layer':>8} {'page cache':>10} {'L1 hit':>6} {'disk/tok':>8} {'pc hit/tok':>10} "
        + " ".join(f"{'ms@' + k:>7}" for k in r["rows"][0]["mac_ms_per_token"]),
    ]
    for row in r["rows"]:
        lines.append(
            f"{100 * row['share']:4.0f}% {row['in_process_experts_per_layer']:8d} {row['page_cache_experts']:10d} "
            f"{row['in_process_hit_rate']:6.2f} {row['disk_per_token']:8.1f} {row['page_cache_per_token']:10.1f} "
            + " ".join(f"{v:7.1f}" for v in row["mac_ms_per_token"].values())
        )
    lines.append(f"lowest projected time at share (by copy rate, GB/s): {r['best_share_by_copy_rate']} "
                 f"(default {default} GB/s); ms = disk experts at 5.5 GB/s + page-cache hits at the copy rate")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the simulated sweep and print it (and the JSON with --json)."""
    from engine.diagnostics.cache_sweep import parse_fractions

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spare-gb", type=float, default=26.5, help="RAM for both levels (GB; default: 397B on a 48 GB Mac)")
    p.add_argument("--shares", type=parse_fractions, default=[0.0, 0.05, 0.15, 0.3, 0.5, 0.75, 1.0])
    p.add_argument("--tokens", type=int, default=1500)
    p.add_argument("--warmup-tokens", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    r = sweep(a.spare_gb * 1e9, a.shares, a.tokens, a.warmup_tokens, a.seed)
    print(format_table(r))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(r, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
