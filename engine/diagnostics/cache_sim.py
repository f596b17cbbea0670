"""Replay a routing trace through the engine's expert cache: hit rates of a policy, LRU and optimum.

The replay drives ``engine.model.expert_cache.ExpertCache`` (the class the streamer uses, on a
pool with no parameters, so nothing is allocated) the way ``ExpertStreamer.ensure`` does: each
line is one layer call whose experts are pinned while it places them. Prefill lines pass through
the cache (the engine caches what the prompt read) but only decode lines are counted. The pool is
shared by every layer, as the engine's is; ``cache_experts`` is the number of slots per layer.

Belady's optimum runs through the same cache with a policy that knows each key's next use.
``static-oracle`` is a second offline bound: LFU by each key's use count over the whole trace
(perfect knowledge of the static popularity, none of the order): the most a policy that only
learns which experts are popular could reach.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from engine.diagnostics.traces import Trace, TraceError, read_trace
from engine.model.cache_policies import DEFAULT_POLICY, BeladyPolicy, Key, ReplacementPolicy, _LazyMinHeap, make_policy

OFFLINE = ("belady", "static-oracle")  # policies that need the whole trace (replay only)


class StaticOraclePolicy:
    """Evict the resident key with the fewest uses over the whole trace (given up front)."""

    def __init__(self, uses: dict[Key, int]) -> None:
        self.uses = uses
        self._heap = _LazyMinHeap()

    def touch(self, key: Key) -> None:
        """Nothing changes: the priority is static."""

    def miss(self, key: Key) -> None:
        """Nothing changes: the priority is static."""

    def insert(self, key: Key) -> None:
        """``key`` is resident, ranked by its total uses."""
        self._heap.put(key, float(self.uses.get(key, 0)))

    def remove(self, key: Key) -> None:
        """``key`` left the cache."""
        self._heap.discard(key)

    def victim(self, exclude: set[Key]) -> Key | None:
        """The resident key used least over the trace, not in ``exclude``."""
        return self._heap.lowest(exclude)


def trace_uses(trace: Trace, decode_only: bool = True) -> dict[Key, int]:
    """Uses of each (layer, expert) over the trace (decode lines only by default)."""
    uses: dict[Key, int] = {}
    for row, ids in enumerate(trace.experts):
        if decode_only and trace.prefill[row]:
            continue
        layer = int(trace.layers[row])
        for e in ids:
            uses[(layer, e)] = uses.get((layer, e), 0) + 1
    return uses
from engine.model.expert_cache import ExpertCache, SlotPool



@dataclass
class ReplayResult:
    """What one policy achieved on a trace at one size."""

    policy: str
    cache_experts: int  # slots per layer
    hit_rate: float  # decode lookups served from the cache
    misses_per_token: float  # decode expert reads per token
    bytes_per_token: float | None  # decode expert bytes read per token (None: expert size unknown)
    us_per_lookup: float  # CPU time of the replay per lookup (cache + policy bookkeeping)


def _next_uses(trace: Trace) -> list[np.ndarray]:
    """For each line, the lookup index of each of its keys' next use (inf when never)."""
    nxt: dict[tuple[int, int], float] = {}
    out: list[np.ndarray] = [np.empty(0)] * len(trace.experts)
    position = sum(len(e) for e in trace.experts)
    for row in range(len(trace.experts) - 1, -1, -1):
        layer = int(trace.layers[row])
        ids = trace.experts[row]
        position -= len(ids)
        here = np.empty(len(ids))
        for j, e in enumerate(ids):
            key = (layer, e)
            here[j] = nxt.get(key, math.inf)
            nxt[key] = position + j
        out[row] = here
    return out


def replay(
    trace: Trace, cache_experts: int, policy: str, per_layer: bool = False,
    factory: Callable[[int, int], ReplacementPolicy] | None = None,
) -> ReplayResult:
    """Replay ``trace`` with ``cache_experts`` slots per layer under ``policy`` (or "belady").

    The pool is shared by all layers, as the engine's is; ``per_layer`` gives each layer a cache
    of its own instead (equal fixed budgets), for comparison. ``factory`` (slots, layers) builds
    the policy instead of the name (which then only labels the result); a policy with an
    ``at_token`` method is told each line's token before its lookups (offline bounds).
    """
    h = trace.header
    k = max(len(e) for e in trace.experts)
    if cache_experts < k:
        raise TraceError(f"--cache-experts {cache_experts}: a layer call needs {k} slots (the trace's top-k)")
    belady = policy == "belady"
    uses = trace_uses(trace) if policy == "static-oracle" else None
    groups = [[l] for l in range(h.moe_layers)] if per_layer else [list(range(h.moe_layers))]
    caches: list[ExpertCache] = []
    policies: list[ReplacementPolicy] = []
    for layers in groups:
        slots = min(cache_experts, h.experts_per_layer) * len(layers)
        chosen: ReplacementPolicy = (
            factory(slots, len(layers)) if factory is not None
            else BeladyPolicy(slots) if belady
            else StaticOraclePolicy(uses) if uses is not None
            else make_policy(policy, slots, len(layers))
        )  # fmt: skip
        policies.append(chosen)
        caches.append(ExpertCache(SlotPool([], slots), chosen, layer_experts={l: h.experts_per_layer for l in layers}))
    cache_of = [caches[l if per_layer else 0] for l in range(h.moe_layers)]
    nexts = _next_uses(trace) if belady and factory is None else None
    clocks = [getattr(p, "at_token", None) for p in policies]
    clock_of = [clocks[l if per_layer else 0] for l in range(h.moe_layers)]
    hits = misses = 0
    lookups = 0
    t0 = time.process_time()  # CPU time: less disturbed by other processes than wall time
    for row, ids in enumerate(trace.experts):
        layer = int(trace.layers[row])
        cache = cache_of[layer]
        keys = [(layer, e) for e in ids]
        pinned = set(keys)
        count = not trace.prefill[row]
        here = nexts[row] if nexts is not None else None
        clock = clock_of[layer]
        if clock is not None:
            clock(int(trace.tokens[row]))
        for j, key in enumerate(keys):
            if here is not None:
                cache.policy.next_use = float(here[j])  # type: ignore[attr-defined]  # (BeladyPolicy)
            if cache.lookup(key) is not None:
                hits += count
            else:
                misses += count
                cache.assign(key, pinned)
        lookups += len(keys)
    elapsed = time.process_time() - t0
    tokens = max(1, trace.decode_tokens)
    total = hits + misses
    per_token = misses / tokens
    return ReplayResult(
        policy=policy + (" per-layer" if per_layer else ""),
        cache_experts=cache_experts,
        hit_rate=hits / total if total else 0.0,
        misses_per_token=per_token,
        bytes_per_token=per_token * h.expert_bytes if h.expert_bytes else None,
        us_per_lookup=1e6 * elapsed / max(1, lookups),
    )


def parse_size(text: str, experts_per_layer: int) -> int:
    """``N`` experts per layer, or ``P%`` of a layer's experts (rounded)."""
    try:
        if text.endswith("%"):
            return max(1, round(float(text[:-1]) / 100 * experts_per_layer))
        return int(text)
    except ValueError:
        raise TraceError(f"--cache-experts: expected a number of experts or a percentage, got {text!r}") from None


def compare(trace: Trace, cache_experts: int, policy: str = DEFAULT_POLICY) -> dict[str, object]:
    """The policy, LRU and Belady's optimum at one size, as the --json object."""
    mine = replay(trace, cache_experts, policy)
    lru = mine if policy == "lru" else replay(trace, cache_experts, "lru")
    best = replay(trace, cache_experts, "belady")
    return {
        "policy": policy,
        "cache_experts": cache_experts,
        "cache_fraction": cache_experts / trace.header.experts_per_layer,
        "hit_rate": mine.hit_rate,
        "lru_hit_rate": lru.hit_rate,
        "optimal_hit_rate": best.hit_rate,
        "bytes_per_token": mine.bytes_per_token,
        "lru_bytes_per_token": lru.bytes_per_token,
        "optimal_bytes_per_token": best.bytes_per_token,
        "us_per_lookup": mine.us_per_lookup,
        "lru_us_per_lookup": lru.us_per_lookup,
        "decode_tokens": trace.decode_tokens,
        "results": [asdict(r) for r in (mine, lru, best)],
    }


def compare_table(trace: Trace, sizes: list[int], policies: list[str], per_layer: list[str] | None = None) -> list[str]:
    """A Markdown table: hit rate of each policy at each size, with LRU's and the optimum's.

    Cells read ``hit% (share of optimal)``; the last row is each policy's CPU time per lookup.
    ``per_layer`` policies are also replayed with equal per-layer budgets.
    """
    names = ["belady", "lru", *[p for p in policies if p != "lru"]]
    extra = [(p, True) for p in per_layer or []]
    runs = [(n, False) for n in names] + extra
    head = ["experts/layer (share)"] + [f"{n}{' per-layer' if pl else ''}" for n, pl in runs]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    cost: dict[str, list[float]] = {}
    for size in sizes:
        results = [replay(trace, size, n, pl) for n, pl in runs]
        best = results[0].hit_rate
        cells = [f"{size} ({100 * size / trace.header.experts_per_layer:.0f}%)"]
        for r in results:
            share = f" ({r.hit_rate / best:.2f})" if best and r.policy != "belady" else ""
            cells.append(f"{100 * r.hit_rate:.1f}%{share}")
            cost.setdefault(r.policy, []).append(r.us_per_lookup)
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| CPU us/lookup | " + " | ".join(f"{sum(v) / len(v):.2f}" for v in cost.values()) + " |")
    return lines


def _check_model(trace: Trace, model: str, path: str) -> None:
    """Refuse a trace recorded from a model other than ``model`` (a model directory)."""
    from pathlib import Path

    from engine.diagnostics.traces import TraceHeader
    from engine.model.loader import inspect_experts

    inspected = inspect_experts(Path(model).expanduser().resolve())
    layers = inspected.layers
    theirs = TraceHeader(inspected.config["model_type"], len(layers), layers[0].num_experts, inspected.k)
    trace.header.check_model(theirs, path)


def describe(result: dict[str, object]) -> str:
    """Human-readable lines of ``compare``'s result."""
    lines = [
        f"cache {result['cache_experts']} experts per layer ({100 * float(result['cache_fraction']):.1f}%), "  # type: ignore[arg-type]
        f"{result['decode_tokens']} decode tokens"
    ]
    for r in result["results"]:  # type: ignore[attr-defined]
        per = f"{r['bytes_per_token'] / 2**20:.1f} MiB" if r["bytes_per_token"] is not None else f"{r['misses_per_token']:.1f} experts"
        lines.append(
            f"  {r['policy']:<10} hit rate {100 * r['hit_rate']:5.1f}%  read per token {per}  "
            f"bookkeeping {r['us_per_lookup']:.2f} us/lookup"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``moebar-engine cache-sim``."""
    p = argparse.ArgumentParser(prog="moebar-engine cache-sim", description=__doc__.splitlines()[0])
    p.add_argument("trace", help="routing trace file to replay (from the app's routing-traces/ or synth-trace)")
    p.add_argument("--cache-experts", required=True, action="append",
                   help="slots per layer: a count, or a percentage of a layer's experts (e.g. 5%%); repeat for a curve")
    p.add_argument("--policy", default=DEFAULT_POLICY,
                   help="lru-layer, lru, lru-adaptive, arc, wtinylfu, wtinylfu:WINDOW, lrfu, lfu, lrfu:HALF_LIFE (default: the engine's)")
    p.add_argument("--model", help="model directory the trace must belong to (refused otherwise)")
    p.add_argument("--json", action="store_true", help="one JSON object per size")
    p.add_argument("--compare", metavar="POLICIES",
                   help="comma-separated policies (also static-oracle, an offline bound): print one Markdown table of all sizes")
    p.add_argument("--per-layer", metavar="POLICIES", default="", help="with --compare: these also with equal per-layer budgets")
    return p


def main(argv: list[str] | None = None) -> int:
    """``moebar-engine cache-sim TRACE --cache-experts N [--policy NAME] [--json]``."""
    args = build_parser().parse_args(argv)
    trace = read_trace(args.trace)
    if args.model:
        _check_model(trace, args.model, args.trace)
    try:
        make_policy(args.policy, 1)
    except ValueError as e:
        raise TraceError(f"--policy: {e}") from None
    sizes = [parse_size(text, trace.header.experts_per_layer) for text in args.cache_experts]
    if args.compare:
        names = [n.strip() for n in args.compare.split(",") if n.strip()]
        per_layer = [n.strip() for n in args.per_layer.split(",") if n.strip()]
        for name in names + per_layer:
            if name not in OFFLINE:
                try:
                    make_policy(name, 1)
                except ValueError as e:
                    raise TraceError(f"--compare: {e}") from None
        print("\n".join(compare_table(trace, sizes, names, per_layer)))
        return 0
    for size in sizes:
        result = compare(trace, size, args.policy)
        print(json.dumps(result) if args.json else describe(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
