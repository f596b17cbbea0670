"""``moebar-engine bench-ranks``: the communication cost of expert parallelism, measured on loopback.

Starts ``--ranks`` processes of this module on 127.0.0.1 (mlx.distributed's ring backend, a
hostfile of free ports) and times, on every rank, the collectives one token costs: one
``all_sum`` of the per-slot outputs ``[K, hidden]`` per MoE layer and one of the sampled token.
It also times the prefill's combination for a pass of ``--prefill-tokens``, and the engine's own
per-layer combination (``ExpertParallel.run_layer``) in decode and prefill, old (an ``all_sum`` of
every row) beside new (only owned rows, by ``all_gather``, where that sends fewer bytes), with the
bytes each rank sends. Rank 0 prints the medians as a table or JSON. The ranks share one machine (and one disk) here, so this measures the
communication only; the speed-up of reading on several machines is projected from it and the disk
rate (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``moebar-engine bench-ranks``."""
    p = argparse.ArgumentParser(prog="moebar-engine bench-ranks", description=__doc__.splitlines()[0])
    p.add_argument("--ranks", type=int, default=2, help="processes to start on 127.0.0.1 (default 2)")
    p.add_argument("--hidden", type=int, default=4096, help="hidden size (default 4096: Qwen3.5-397B)")
    p.add_argument("--k", type=int, default=10, help="experts per token (default 10)")
    p.add_argument("--layers", type=int, default=60, help="MoE layers per token (default 60)")
    p.add_argument("--prefill-tokens", type=int, default=512, help="tokens of one prefill pass (default 512)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16", help="activation dtype")
    p.add_argument("--repeats", type=int, default=200, help="timed collectives per shape (default 200)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--model", default="", help="also decode this model on the ranks and in one process, side by side")
    p.add_argument("--decode-tokens", type=int, default=16, help="tokens to decode with --model (default 16)")
    p.add_argument("--project", action="store_true",
                   help="print the projected decode speed on 1, 2 and 4 machines instead of measuring")
    p.add_argument("--experts", type=int, default=512, help="experts per layer, of the routings timed and of --project (default 512)")
    p.add_argument("--expert-bytes", type=int, default=7_077_888, help="bytes of one expert, for --project")
    p.add_argument("--disk-gbps", type=float, default=5.5, help="each machine's SSD read rate in GB/s, for --project")
    p.add_argument("--link-ms", type=float, default=0.15,
                   help="one collective of a layer over the link in ms, for --project (default 0.15)")
    return p


def busiest_rank_experts(ranks: int, experts: int, k: int, samples: int = 20000, seed: int = 0) -> float:
    """Mean over layers of the routed experts the busiest rank reads (owner ``e % ranks``, uniform routing)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    picks = np.argsort(rng.random((samples, experts)), axis=1)[:, :k]  # k distinct experts per layer
    owners = picks % ranks
    counts = np.stack([(owners == r).sum(axis=1) for r in range(ranks)], axis=1)
    return float(counts.max(axis=1).mean())


def project_decode(ranks: int, *, experts: int, k: int, layers: int, expert_bytes: int, disk_bytes_per_s: float,
                   hit_rate: float, link_ms_per_layer: float, compute_ms_per_token: float = 0.0) -> dict[str, float]:
    """Projected decode time per token on ``ranks`` machines, each reading its own experts from its own SSD.

    Each layer waits for its busiest rank's misses (reads are not overlapped across layers, as in
    the engine's serial bound); the collective of each layer adds ``link_ms_per_layer``.
    """
    busiest = busiest_rank_experts(ranks, experts, k) if ranks > 1 else float(k)
    read_s = layers * busiest * (1 - hit_rate) * expert_bytes / disk_bytes_per_s
    link_s = (layers + 1) * link_ms_per_layer / 1e3 if ranks > 1 else 0.0
    per_token = read_s + link_s + compute_ms_per_token / 1e3
    return {"ranks": ranks, "busiest_rank_experts": busiest, "read_s": read_s, "link_s": link_s,
            "s_per_token": per_token, "tok_per_s": 1 / per_token}


def free_loopback_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports free on 127.0.0.1 now (for loopback ranks' hostfiles)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def loopback_hostfile(path: Path, ranks: int) -> Path:
    """Write a ring hostfile for ``ranks`` processes on 127.0.0.1 at ``path``; return it."""
    path.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in free_loopback_ports(ranks)]))
    return path


def _time_all_sum(shape: tuple[int, ...], dtype: Any, repeats: int, group: Any) -> float:
    """Median seconds of one all_sum of ``shape`` (evaluated), after a warm-up."""
    import mlx.core as mx

    x = mx.ones(shape, dtype=dtype)
    for _ in range(5):
        mx.eval(mx.distributed.all_sum(x, group=group))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, group=group))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _CopySwitch:
    """Stands in for an expert layer in the bench: each routed row comes back unchanged."""

    layer = 0

    def run_pairs(self, rows: Any, experts: Any, call_pairs: int = 0) -> Any:
        return rows


def routings(tokens: int, experts: int, k: int, count: int, seed: int = 0) -> list[Any]:
    """``count`` uniform routings of ``tokens`` tokens: ``[1, tokens, k]`` distinct expert ids each."""
    import numpy as np

    rng = np.random.default_rng(seed)  # the same seed on every rank: the ranks must agree on the routing
    return [np.argsort(rng.random((1, tokens, experts)), axis=-1)[..., :k] for _ in range(count)]


def time_combine(group: Any, modes: tuple[str, ...], hidden: int, dtype: Any, host_idx: list[Any],
                 repeats: int) -> dict[str, dict[str, Any]]:
    """The engine's per-layer combination (``ExpertParallel.run_layer``) under each of ``modes``
    ("all_sum", "auto", "gather"), alternated call by call so that a busy machine weighs on each
    alike: per mode the median ms, the mean bytes each rank sent, the share of layers gathered.
    Routings cycle through ``host_idx``."""
    import mlx.core as mx

    from engine.model.expert_parallel import ExpertParallel

    pars = {m: ExpertParallel(group=group, rank=group.rank(), size=group.size(), combine=m) for m in modes}
    x = mx.ones((1, host_idx[0].shape[1], hidden), dtype=dtype)
    mx.eval(x)
    times: dict[str, list[float]] = {m: [] for m in modes}
    for i in range(repeats + 2):
        for mode, par in pars.items():
            if i == 2:  # after two warm-up calls of each
                par.bytes_sent = par.gathered_layers = 0
            t0 = time.perf_counter()
            mx.eval(par.run_layer(_CopySwitch(), x, host_idx[i % len(host_idx)]))  # type: ignore[arg-type]
            if i >= 2:
                times[mode].append(time.perf_counter() - t0)
    return {m: {"ms": statistics.median(times[m]) * 1e3, "bytes_sent": par.bytes_sent / repeats,
                "gathered_fraction": par.gathered_layers / repeats} for m, par in pars.items()}


def decode_run(model: str, tokens: int) -> dict[str, Any]:
    """Greedy decode of ``tokens`` after a short prompt: decode seconds per token, collectives, tokens."""
    from engine.engine import Engine
    from engine.types import EngineOptions, SamplingParams

    engine = Engine.load(model, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        prompt = [(i * 7919) % 5000 + 100 for i in range(16)]
        before = engine.parallel.collectives if engine.parallel else 0
        out, stats = [], None
        for ev in engine.generate(prompt, SamplingParams(temperature=0.0, max_tokens=tokens)):
            out.append(ev.token)
            stats = ev.stats
        assert stats is not None
        decoded = max(1, stats.generated_tokens - 1)
        return {
            "tokens": out,
            "decode_s_per_token": stats.decode_s / decoded,
            "collectives_per_token": ((engine.parallel.collectives - before) / len(out)) if engine.parallel else 0.0,
            "bytes_read_per_token": engine.expert_counters()["bytes_read"] / max(1, len(out)),
        }
    finally:
        engine.close()


def _rank_main(args: argparse.Namespace) -> dict[str, Any]:
    import mlx.core as mx

    group = mx.distributed.init(strict=True, backend="ring")
    decode = decode_run(args.model, args.decode_tokens) if args.model else None
    dtype = getattr(mx, args.dtype)
    layer_s = _time_all_sum((1, args.k, args.hidden), dtype, args.repeats, group)
    token_s = _time_all_sum((1,), mx.int32, args.repeats, group)
    prefill_s = _time_all_sum((args.prefill_tokens * args.k, args.hidden), dtype, max(5, args.repeats // 20), group)
    # the engine's combination, old (all_sum of every row) and new (owned rows where fewer bytes), side by side
    decode_routes = routings(1, args.experts, args.k, 64)
    prefill_routes = routings(args.prefill_tokens, args.experts, args.k, 1)
    one = time_combine(group, ("all_sum", "auto"), args.hidden, dtype, decode_routes, args.repeats)
    many = time_combine(group, ("all_sum", "auto"), args.hidden, dtype, prefill_routes, max(5, args.repeats // 20))
    combine = {"decode_all_sum": one["all_sum"], "decode_auto": one["auto"],
               "prefill_all_sum": many["all_sum"], "prefill_auto": many["auto"]}
    return {
        "rank": group.rank(),
        "ranks": group.size(),
        "hidden": args.hidden,
        "k": args.k,
        "dtype": args.dtype,
        "layer_all_sum_ms": layer_s * 1e3,
        "token_agree_ms": token_s * 1e3,
        "per_token_ms": (layer_s * args.layers + token_s) * 1e3,
        "layers": args.layers,
        "prefill_pass_tokens": args.prefill_tokens,
        "prefill_layer_all_sum_ms": prefill_s * 1e3,
        "payload_bytes_per_layer": args.k * args.hidden * (2 if args.dtype == "bfloat16" else 4),
        "decode": decode,
        "experts": args.experts,
        "combine": combine,
    }


def main(argv: list[str] | None = None) -> int:
    """Start the ranks on loopback (or, inside a rank, measure) and print rank 0's figures."""
    args = build_parser().parse_args(argv)
    if args.project:
        rows = [project_decode(r, experts=args.experts, k=args.k, layers=args.layers, expert_bytes=args.expert_bytes,
                               disk_bytes_per_s=args.disk_gbps * 1e9, hit_rate=h, link_ms_per_layer=args.link_ms)
                | {"hit_rate": h} for h in (0.0, 0.3, 0.6) for r in (1, 2, 4)]
        if args.json:
            print(json.dumps(rows))
            return 0
        print(f"projected decode, {args.layers} layers x K {args.k} of {args.experts} experts, "
              f"{args.expert_bytes:,} B each, {args.disk_gbps} GB/s per machine, {args.link_ms} ms per collective")
        for row in rows:
            print(f"  hit rate {row['hit_rate']:.0%}  {row['ranks']} machine(s): busiest reads "
                  f"{row['busiest_rank_experts']:.2f} experts/layer, {row['s_per_token'] * 1e3:.0f} ms/token, "
                  f"{row['tok_per_s']:.2f} tok/s")
        return 0
    if os.environ.get("MOEBAR_BENCH_RANK_OUT"):
        result = _rank_main(args)
        Path(os.environ["MOEBAR_BENCH_RANK_OUT"]).write_text(json.dumps(result))
        return 0
    if args.ranks < 2:
        print("error: --ranks must be at least 2", file=sys.stderr)
        return 2
    single = decode_run(args.model, args.decode_tokens) if args.model else None
    with tempfile.TemporaryDirectory(prefix="moebar-ranks-") as tmp:
        hostfile = loopback_hostfile(Path(tmp) / "hosts.json", args.ranks)
        procs = []
        for r in range(args.ranks):
            env = dict(os.environ, MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile),
                       MOEBAR_BENCH_RANK_OUT=str(Path(tmp) / f"rank{r}.json"))
            cmd = [sys.executable, "-m", "engine.diagnostics.ranks_bench", *(argv if argv is not None else sys.argv[1:])]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait(timeout=600) for p in procs]
        if any(codes):
            print(f"error: a rank failed (exit codes {codes})", file=sys.stderr)
            return 1
        results = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    r0 = results[0]
    if single is not None:
        r0["single_process_decode"] = single
        r0["same_tokens"] = all(r["decode"]["tokens"] == single["tokens"] for r in results)
    if args.json:
        print(json.dumps({**r0, "per_rank_layer_all_sum_ms": [r["layer_all_sum_ms"] for r in results]}))
        return 0 if r0.get("same_tokens", True) else 1
    print(f"{args.ranks} ranks on 127.0.0.1, hidden {args.hidden}, K {args.k}, {args.dtype}")
    print(f"  per MoE layer (decode): all_sum of {r0['payload_bytes_per_layer']:,} bytes  {r0['layer_all_sum_ms']:.3f} ms")
    print(f"  per token: {args.layers} layers + token agreement              {r0['per_token_ms']:.2f} ms")
    print(f"  per layer of a {args.prefill_tokens}-token prefill pass                {r0['prefill_layer_all_sum_ms']:.2f} ms")
    c = r0["combine"]
    print(f"  the engine's combination per MoE layer ({args.experts} experts, uniform routing), old | new:")
    for label, old_key, new_key in (("decode (1 token)", "decode_all_sum", "decode_auto"),
                                    (f"prefill ({args.prefill_tokens} tokens)", "prefill_all_sum", "prefill_auto")):
        o, n = c[old_key], c[new_key]
        print(f"    {label:<22} all_sum {o['bytes_sent'] / 2**20:9.3f} MiB sent {o['ms']:9.3f} ms | "
              f"owned rows {n['bytes_sent'] / 2**20:9.3f} MiB sent {n['ms']:9.3f} ms "
              f"(gathered in {n['gathered_fraction']:.0%} of layers)")
    if single is not None:
        d = r0["decode"]
        print(f"  decode of {args.model}: one process {single['decode_s_per_token'] * 1e3:.1f} ms/token, "
              f"{args.ranks} ranks {d['decode_s_per_token'] * 1e3:.1f} ms/token "
              f"({d['collectives_per_token']:.1f} collectives/token), same tokens: {r0['same_tokens']}")
        return 0 if r0["same_tokens"] else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
