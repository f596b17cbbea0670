"""``bench --cache-sweep SHARES --cgroup-limit-mb L``: the in-process cache's share of the spare RAM.

A Mac whose model is larger than its RAM, in miniature: each row runs the engine in a fresh
Linux memory cgroup of ``L`` MiB, which is charged with the engine's own memory *and* the page
cache its expert reads fill, and reclaims page cache at the limit. The engine gets
``--memory-limit-mb L``; the spare (what the budget's fixed part leaves under L) is split: the
row's share goes to the in-process expert cache, the rest is left to the page cache. Each row
starts with the model's pages evicted, warms both caches with one sampled generation, then
measures several sampled generations (distinct prompts, fixed seeds: the same tokens in every
row). Per row: the in-process hit rate, expert bytes the engine asked the OS for, bytes the disk
actually read (``/proc/self/io`` read_bytes), their difference (page-cache hits), major faults,
peak RSS, the cgroup's charge, OOM kills, and tok/s. The share that minimises the projected time
per token on a Mac (disk bytes at its SSD rate + page-cache hits at a copy rate; compute is the
same for every row) is what engine.model.memory_budget.CACHE_SHARE_OF_SPARE is chosen from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

from engine.platform.cgroup import MemoryCgroup, add_to_cgroup, memory_cgroup_root
from engine.types import EngineOptions

MIB = 2**20
# Projection to a Mac (stated in BENCHMARKS.md): an M3 Max's cold SSD reads (DESIGN.md) and an
# assumed rate for a pread served by the page cache (a kernel copy into the slot buffer).
MAC_DISK_BYTES_PER_S = 5.5e9
MAC_COPY_BYTES_PER_S = 20e9
COPY_RATES_CHECKED = (10e9, 20e9, 40e9)


def proc_read_bytes(io_path: str | Path = "/proc/self/io") -> int:
    """Bytes this process (all its threads) made the storage layer fetch: page-cache misses."""
    for line in Path(io_path).read_text().splitlines():
        if line.startswith("read_bytes:"):
            return int(line.split()[1])
    raise ValueError(f"{io_path}: no read_bytes line")


def major_faults(stat_path: str | Path = "/proc/self/stat") -> int:
    """Major page faults of this process so far (a mapped page that had to be read back)."""
    text = Path(stat_path).read_text()
    fields = text[text.rindex(")") + 2 :].split()  # after "pid (comm) "
    return int(fields[9])  # field 12 of stat(5): majflt


def projected_ms_per_token(
    disk_bytes: float, page_cache_bytes: float, disk_rate: float = MAC_DISK_BYTES_PER_S,
    copy_rate: float = MAC_COPY_BYTES_PER_S,
) -> float:  # fmt: skip
    """Milliseconds a token spends getting its experts on a Mac: disk reads plus page-cache copies."""
    return 1000.0 * (disk_bytes / disk_rate + page_cache_bytes / copy_rate)


def choose_share(rows: list[dict[str, Any]], copy_rate: float = MAC_COPY_BYTES_PER_S) -> float | None:
    """The share whose projected time per token is lowest among rows that ran to the end."""
    ok = [r for r in rows if r.get("ok")]
    if not ok:
        return None
    best = min(ok, key=lambda r: (projected_ms_per_token(r["disk_bytes_per_token"], r["page_cache_bytes_per_token"],
                                                         copy_rate=copy_rate), r["share"]))  # fmt: skip
    return float(best["share"])


def _prompts(count: int, length: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[rng.randrange(1000, 100_000) for _ in range(length)] for _ in range(count)]


def measure_row(a: argparse.Namespace) -> dict[str, Any]:
    """In the cgroup's process: size the cache from the share, warm up, measure; return the figures."""
    from engine.engine import Engine
    from engine.model.loader import _load_tokenizer, inspect_experts, memory_budget_for, pick_device
    from engine.model.mlx_memory import mlx_memory
    from engine.platform_info import peak_rss_bytes
    from engine.types import EngineOptions, SamplingParams

    model = Path(a.model)
    device = pick_device(a.device)
    common = dict(memory_limit_mb=a.limit_mb, context_tokens=a.context_tokens, device=device,
                  io_threads=a.io_threads, cache_policy=a.cache_policy, use_packed=a.layout == "packed")  # fmt: skip
    # the budget's fixed part, as a load (and `moebar-engine plan`) measures it
    inspected = inspect_experts(model)
    _load_tokenizer(model, inspected.config)
    budget = memory_budget_for(inspected, EngineOptions(cache_mb=None, **common), device)  # type: ignore[arg-type]
    del inspected
    spare = max(0, budget.limit_bytes - budget.needs.fixed_bytes) if budget.limit_bytes else 0
    engine = Engine.load(model, EngineOptions(cache_mb=a.share * spare / MIB, **common), measure_disk=False)  # type: ignore[arg-type]
    prompts = _prompts(a.prompts + 1, a.prompt_tokens, a.seed)

    def sampling(i: int, tokens: int) -> SamplingParams:
        return SamplingParams(temperature=a.temperature, seed=a.seed + i, max_tokens=tokens)

    list(engine.generate(prompts[0], sampling(0, a.warmup_tokens)))  # fills both caches
    c0, io0, mf0, t0 = engine.expert_counters(), proc_read_bytes(), major_faults(), time.perf_counter()
    rates, generated = [], 0
    for i, prompt in enumerate(prompts[1:], start=1):
        events = list(engine.generate(prompt, sampling(i, a.tokens)))
        s = events[-1].stats
        rates.append(s.decode_tps)
        generated += s.decode.tokens + 1  # the first token comes with the prefill
    wall = time.perf_counter() - t0
    c1, io1, mf1 = engine.expert_counters(), proc_read_bytes(), major_faults()
    hits, misses = c1["cache_hits"] - c0["cache_hits"], c1["cache_misses"] - c0["cache_misses"]
    requested = c1["bytes_read"] - c0["bytes_read"]
    disk = io1 - io0
    cg_stat: dict[str, int] = {}
    if a.cgroup_dir:
        cg_stat = MemoryCgroup(Path(a.cgroup_dir)).stat()
    mem = mlx_memory()
    out = {
        "share": a.share,
        "spare_bytes": spare,
        "fixed_bytes": budget.needs.fixed_bytes,
        "cache_bytes": engine.plan.cache_budget_bytes,
        "cache_resident_bytes": c1["expert_cache_bytes"],
        "tokens": generated,
        "hit_rate": hits / (hits + misses) if hits + misses else 0.0,
        "requested_bytes_per_token": requested / generated,
        "disk_bytes_per_token": disk / generated,
        # readahead can read more than was asked: a negative difference counts as no hits
        "page_cache_bytes_per_token": max(0, requested - disk) / generated,
        "major_faults_per_token": (mf1 - mf0) / generated,
        "decode_tps": statistics.median(rates),
        "window_tps": generated / wall,
        "peak_rss_bytes": peak_rss_bytes(),
        "mlx_peak_bytes": mem.peak_bytes,
        "cgroup_rss_bytes": cg_stat.get("rss", 0),
        "cgroup_cache_bytes": cg_stat.get("cache", 0),
    }
    engine.close()
    return out


def _evict_model(model: Path) -> None:
    """Drop the model's pages from the page cache, so that every page a row reads is charged to its cgroup."""
    from engine.platform_info import drop_file_cache

    for path in sorted(p for p in model.rglob("*") if p.is_file()):
        fd = os.open(path, os.O_RDONLY)
        try:
            drop_file_cache(fd)
        finally:
            os.close(fd)


def _row_command(args: argparse.Namespace, model: Path, share: float, cgroup: MemoryCgroup) -> list[str]:
    temperature = getattr(args, "temperature", None)
    return [
        sys.executable, "-m", "engine.diagnostics.cgroup_sweep", "--model", str(model),
        "--limit-mb", str(args.cgroup_limit_mb), "--share", repr(share), "--cgroup-dir", str(cgroup.path),
        "--context-tokens", str(args.context_tokens), "--warmup-tokens", str(args.warmup_tokens),
        "--tokens", str(args.decode_tokens), "--prompts", str(args.repeats), "--device", args.device,
        "--io-threads", str(args.io_threads), "--cache-policy", args.cache_policy,
        "--temperature", repr(1.0 if temperature is None else temperature),
        "--layout", getattr(args, "layout", "packed"),
    ]  # fmt: skip


def _text(out: str | bytes | None) -> str:
    """A subprocess's captured output as text (TimeoutExpired holds bytes on POSIX even with text=True)."""
    if isinstance(out, bytes):
        return out.decode("utf-8", errors="replace")
    return out or ""


def run_cgroup_sweep(
    args: argparse.Namespace,
    model: Path,
    shares: list[float],
    *,
    root: Path | None = None,
    make_cgroup: Callable[[Path, str, int], MemoryCgroup] = MemoryCgroup.create,
    row_timeout_s: float = 600.0,
) -> dict[str, Any]:
    """One engine process per share, each in a fresh memory cgroup of ``args.cgroup_limit_mb``."""
    from engine.model.loader import inspect_experts

    root = memory_cgroup_root() if root is None else root
    layers = inspect_experts(model).layers
    limit = int(args.cgroup_limit_mb * MIB)
    rows = []
    for i, share in enumerate(shares):
        _evict_model(model)
        cgroup = make_cgroup(root, f"moebar-sweep-{os.getpid()}-{i}", limit)
        row: dict[str, Any] | None = None
        try:
            cmd = _row_command(args, model, share, cgroup)
            t0 = time.perf_counter()
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=row_timeout_s)
                rc, stdout, stderr = proc.returncode, proc.stdout, proc.stderr
            except subprocess.TimeoutExpired as e:  # the process is killed; thrashing looks like this
                rc, stdout, stderr = None, "", _text(e.stderr)
            row = {"share": share, "returncode": rc, "seconds": time.perf_counter() - t0}
            lines = [l for l in stdout.splitlines() if l.startswith("{")]
            if rc == 0 and lines:
                row.update(json.loads(lines[-1]))
                row["ok"] = True
            else:
                row["ok"] = False
                row["stderr_tail"] = stderr[-2000:]
            row["oom_kills"] = cgroup.oom_kills()
            row["cgroup_max_usage_bytes"] = cgroup.max_usage_bytes()
            row["cgroup_limit_bytes"] = cgroup.limit_bytes()
        finally:
            try:
                cgroup.remove()
            except OSError as e:  # (EBUSY after retries): the row stands; the cgroup is left to remove by hand
                warning = f"{e.strerror or e}; remove it by hand once its processes have exited"
                print(f"bench: warning: {warning}", file=sys.stderr, flush=True)
                if row is not None:
                    row["warning"] = warning
        assert row is not None
        rows.append(row)
        print(f"bench: share {100 * share:.0f}%: " + (
            f"hit rate {row['hit_rate']:.2f}, disk {row['disk_bytes_per_token'] / MIB:.2f} MiB/token, "
            f"page cache {row['page_cache_bytes_per_token'] / MIB:.2f} MiB/token, {row['decode_tps']:.2f} tok/s"
            if row["ok"] else f"failed (rc {row['returncode']}, OOM kills {row['oom_kills']})"), file=sys.stderr, flush=True)  # fmt: skip
    return {
        "model": str(model),
        "layers": len(layers),
        "experts": layers[0].num_experts,
        "expert_bytes": layers[0].expert_bytes,
        "expert_bytes_total": sum(l.expert_bytes * l.num_experts for l in layers),
        "cgroup_limit_bytes": limit,
        "warmup_tokens": args.warmup_tokens,
        "decode_tokens": args.decode_tokens,
        "prompts": args.repeats,
        "mac_disk_bytes_per_s": MAC_DISK_BYTES_PER_S,
        "mac_copy_bytes_per_s": MAC_COPY_BYTES_PER_S,
        "chosen_share": choose_share(rows),
        "chosen_share_by_copy_rate": {f"{r / 1e9:g}": choose_share(rows, r) for r in COPY_RATES_CHECKED},
        "rows": rows,
    }


def format_cgroup_sweep(r: dict[str, Any]) -> str:
    """The sweep as a plain-text table, with the projection and the share it picks."""
    first: dict[str, Any] = next((row for row in r["rows"] if row.get("ok")), {})
    lines = [
        f"cgroup sweep: {r['layers']} layers x {r['experts']} experts, {r['expert_bytes_total'] / MIB:.0f} MiB of experts "
        f"under a {r['cgroup_limit_bytes'] / MIB:.0f} MiB cgroup (fixed part {first.get('fixed_bytes', 0) / MIB:.0f} MiB, "
        f"spare {first.get('spare_bytes', 0) / MIB:.0f} MiB); warm-up {r['warmup_tokens']} tokens, then "
        f"{r['prompts']} x {r['decode_tokens']} sampled tokens",
        f"{'share':>5} {'cache':>7} {'hit':>5} {'asked':>7} {'disk':>7} {'pg hit':>7} {'majflt':>6} "
        f"{'peak RSS':>8} {'cg max':>7} {'cg cache':>8} {'OOM':>3} {'tok/s':>6} {'Mac ms':>7}",
        f"{'':>5} {'MiB':>7} {'rate':>5} {'MiB/t':>7} {'MiB/t':>7} {'MiB/t':>7} {'/tok':>6} {'MiB':>8} {'MiB':>7} "
        f"{'MiB':>8} {'':>3} {'':>6} {'/tok':>7}",
    ]
    for row in r["rows"]:
        head = f"{100 * row['share']:4.0f}%"
        if not row.get("ok"):
            lines.append(f"{head} failed: return code {row['returncode']}, OOM kills {row['oom_kills']}, "
                         f"cgroup max {row['cgroup_max_usage_bytes'] / MIB:.0f} MiB")  # fmt: skip
            continue
        ms = projected_ms_per_token(row["disk_bytes_per_token"], row["page_cache_bytes_per_token"],
                                    r["mac_disk_bytes_per_s"], r["mac_copy_bytes_per_s"])  # fmt: skip
        lines.append(
            f"{head} {row['cache_bytes'] / MIB:7.0f} {row['hit_rate']:5.2f} {row['requested_bytes_per_token'] / MIB:7.2f} "
            f"{row['disk_bytes_per_token'] / MIB:7.2f} {row['page_cache_bytes_per_token'] / MIB:7.2f} "
            f"{row['major_faults_per_token']:6.2f} {row['peak_rss_bytes'] / MIB:8.0f} "
            f"{row['cgroup_max_usage_bytes'] / MIB:7.0f} {row['cgroup_cache_bytes'] / MIB:8.0f} {row['oom_kills']:3d} "
            f"{row['decode_tps']:6.2f} {ms:7.2f}"
        )
    lines.append(
        f"Mac ms/tok = disk / {r['mac_disk_bytes_per_s'] / 1e9:g} GB/s + page-cache hits / "
        f"{r['mac_copy_bytes_per_s'] / 1e9:g} GB/s (compute, the same in every row, left out); lowest at share "
        f"{r['chosen_share']}; by copy rate (GB/s): {r['chosen_share_by_copy_rate']}"
    )
    return "\n".join(lines)


def _row_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="one row of the cgroup cache sweep (started by the bench)")
    p.add_argument("--model", required=True)
    p.add_argument("--limit-mb", type=float, required=True)
    p.add_argument("--share", type=float, required=True)
    p.add_argument("--cgroup-dir", default="")
    p.add_argument("--context-tokens", type=int, default=8192)
    p.add_argument("--warmup-tokens", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--prompts", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=8)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--io-threads", type=int, default=4)
    p.add_argument("--cache-policy", default=EngineOptions.cache_policy)
    p.add_argument("--layout", choices=["packed", "safetensors"], default="packed")
    return p


def row_main(argv: list[str] | None = None) -> int:
    """Entry of a row's process: join the cgroup first, then measure and print one JSON line."""
    a = _row_parser().parse_args(argv)
    if a.cgroup_dir:
        add_to_cgroup(Path(a.cgroup_dir) / "cgroup.procs", os.getpid())
    print(json.dumps(measure_row(a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(row_main())
