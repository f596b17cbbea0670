"""``moebar-engine``: generate, plan, pack, demo-model, stdio, serve and bench from the shell."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from engine.errors import MoeBarError
from engine.types import EngineOptions, SamplingParams


def moebar_version() -> str:
    """The installed MoeBar version (package metadata; bundles carry it too)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("moebar")
    except PackageNotFoundError:
        return "unknown (not installed as a package)"


def delegated_parser(name: str) -> argparse.ArgumentParser:
    """The argument parser of a subcommand that lives in its own module (stdio, serve, bench)."""
    import importlib

    module = importlib.import_module(f"engine.{dict((n, m) for n, m, _ in _DELEGATED)[name]}")
    return module.build_parser()  # type: ignore[no-any-return]


def cache_mb_arg(value: str) -> float | None:
    """``--cache-mb``: "auto" (None: sized from this machine) or a size in MiB (>= 0)."""
    if value.strip().lower() == "auto":
        return None
    try:
        mb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a size in MiB, got {value!r}") from None
    if not mb >= 0 or mb == float("inf"):
        raise argparse.ArgumentTypeError(f"must be 'auto' or a finite size >= 0, got {value!r}")
    return mb


def kib_or_zero(value: str) -> int:
    """A size in KiB for argparse: a whole number >= 0."""
    try:
        kib = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of KiB, got {value!r}") from None
    if kib < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 KiB (0: whole experts), got {value!r}")
    return kib


def _positive_mb(value: str) -> float:
    try:
        mb = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MiB, got {value!r}") from None
    if not 0 < mb < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive size in MiB, got {value!r}")
    return mb


def _add_memory_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-mb", type=cache_mb_arg, default=None, metavar="auto|MiB",
                   help="in-process expert cache in MiB, or auto (default): sized from this machine's RAM, "
                        "leaving most of it to the OS page cache")
    p.add_argument("--memory-limit-mb", type=_positive_mb, default=None, metavar="MiB",
                   help="cap the engine's whole footprint (RSS + MLX buffers); a model whose dense part "
                        "does not fit is refused")
    p.add_argument("--context-tokens", type=int, default=8192,
                   help="context the memory budget keeps KV-cache room for (default 8192)")


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    _add_memory_options(p)
    p.add_argument("--experts-per-token", type=int, default=None, help="override K (warns below trained K)")
    p.add_argument("--cold", action="store_true", help="bypass the OS page cache for expert reads")
    p.add_argument("--io-threads", type=int, default=4, help="parallel expert reads")
    p.add_argument("--read-piece-kb", type=kib_or_zero, default=None,
                   help="cut each expert's read into pieces of this many KiB that the I/O threads share (0: "
                        "each expert whole; default with --cold, where reads pass the page cache: 1024 or 0, whichever "
                        "reads faster at load; else 0)")
    p.add_argument("--prefill-chunk", type=int, default=512,
                   help="prompt tokens per attention call of a prefill pass (per chunk for other families); "
                        "with --mlx-lm-shapes on (auto on a GPU) mlx-lm's 2,048 instead")
    p.add_argument("--prefill-pass-tokens", type=int, default=0,
                   help="prompt tokens per pass over the experts (0: as many as --prefill-memory-mb holds)")
    p.add_argument("--prefill-memory-mb", type=float, default=None,
                   help="working memory of one prefill pass (default: min(2048, RAM / 8))")
    p.add_argument("--prefetch", action="store_true", help="predict and read the next layer's experts")
    p.add_argument("--cache-policy", default=EngineOptions.cache_policy,
                   help=f"expert cache policy: {EngineOptions.cache_policy} (default), lru-layer, lru, arc, wtinylfu, lrfu, lfu, "
                        "lrfu:HALF_LIFE, NAME@layer (see engine/model/cache_policies.py)")
    p.add_argument("--hot-set-dir", default="", help="keep the cached experts' ids here and read them back after a load")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the model computes (auto: the GPU when MLX has one)")
    p.add_argument("--no-packed", action="store_true", help="ignore a packed expert layout")
    p.add_argument("--shrink-cache-under-pressure", action=argparse.BooleanOptionalAction, default=True,
                   help="halve the in-process expert cache under memory pressure and grow it back when "
                        "the pressure has passed (default on; off keeps it at the budget's size)")
    p.add_argument(
        "--prefill-matmul", choices=["auto", "on", "off"], default="auto",
        help="long prefill calls: on the CPU, dequantize + dense GEMM (auto: where MLX has a fast BLAS); "
             "on a GPU, 'on' runs each expert's routed rows as one quantized matmul (auto: off there, unmeasured; "
             "other kernels than mlx-lm's, so the tokens may differ from mlx-lm's)",
    )  # fmt: skip
    p.add_argument(
        "--gather-slots", choices=["auto", "on", "off"], default=EngineOptions.gather_slots,
        help="copy the experts of a streaming layer's call (at most 2K: decode, a cold prefill's groups) out of "
             "the slot pool into one compact array before the expert kernels (auto: where the pools are CUDA "
             "managed memory; exact either way)",
    )  # fmt: skip
    p.add_argument(
        "--mlx-lm-shapes", choices=["auto", "on", "off"], default="auto",
        help="call MLX's kernels with mlx-lm's shapes (prompt steps of 2048, the last token alone), so "
             "the tokens equal mlx-lm's where a row's result depends on its call (auto: on a GPU)",
    )  # fmt: skip


def engine_options(args: argparse.Namespace) -> EngineOptions:
    """EngineOptions from parsed command-line arguments."""
    return EngineOptions(
        cache_mb=args.cache_mb,
        memory_limit_mb=args.memory_limit_mb,
        context_tokens=args.context_tokens,
        experts_per_token=args.experts_per_token,
        cold=args.cold,
        io_threads=args.io_threads,
        read_piece_kb=args.read_piece_kb,
        prefill_chunk=args.prefill_chunk,
        prefill_pass_tokens=args.prefill_pass_tokens,
        prefill_memory_mb=args.prefill_memory_mb,
        prefetch=args.prefetch,
        cache_policy=args.cache_policy,
        hot_set_dir=args.hot_set_dir,
        device=args.device,
        use_packed=not args.no_packed,
        prefill_matmul=args.prefill_matmul,
        mlx_lm_shapes=args.mlx_lm_shapes,
        gather_slots=args.gather_slots,
        shrink_cache_under_pressure=args.shrink_cache_under_pressure,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    """Generate from a prompt and print the text (or JSON lines) and optionally the timing."""
    from engine.engine import Engine
    from engine.model.generate import NO_TOKEN

    engine = Engine.load(args.model, engine_options(args), measure_disk=False)
    if args.trace:
        engine.start_trace(args.trace)
    tok = engine.tokenizer
    if args.chat:
        prompt = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True
        )
    else:
        prompt = tok.encode(args.prompt, add_special_tokens=False)
    sampling = SamplingParams(temperature=args.temp, top_p=args.top_p, max_tokens=args.max_tokens, seed=args.seed)
    detok = tok.detokenizer
    detok.reset()
    stats = None
    # Several machines: rank 0 answers; the other ranks follow silently (their last JSON line
    # names the rank and its tokens, so a check can see that every rank agreed).
    follower = engine.parallel is not None and engine.parallel.rank != 0
    tokens: list[int] = []
    for ev in engine.generate(list(prompt), sampling):
        stats = ev.stats
        if ev.token == NO_TOKEN:
            break
        tokens.append(ev.token)
        if ev.token in engine.eos_token_ids:
            piece = ""
        else:
            detok.add_token(ev.token)
            piece = detok.last_segment
        if follower:
            continue
        if args.json:
            print(json.dumps({"token": ev.token, "text": piece}), flush=True)
        else:
            print(piece, end="", flush=True)
    detok.finalize()
    tail = detok.last_segment
    if tail and not args.json and not follower:
        print(tail, end="")
    assert stats is not None
    figures = stats.to_dict()
    figures["expert_counters"] = engine.expert_counters()
    if args.json:
        final: dict[str, Any] = {"stats": figures}
        if engine.parallel is not None:
            final.update(rank=engine.parallel.rank, ranks=engine.parallel.size, tokens=tokens,
                         collectives=engine.parallel.collectives)
        print(json.dumps(final), flush=True)
    elif not follower:
        print()
    if args.timing:
        print(timing_report(figures), file=sys.stderr)
    engine.close()
    return 0


def timing_report(s: dict[str, Any]) -> str:
    """Where the time went, per decode token and for the prefill."""
    lines = [
        f"prompt: {s['prompt_tokens']} tokens in {s['prompt_s']:.2f} s ({s['prompt_tps']:.1f} tok/s), "
        f"time to first token {s['ttft_s']:.2f} s",
        f"decode: {s['generated_tokens']} tokens, {s['decode_tps']:.2f} tok/s",
    ]
    d = s["decode"]
    n = max(1, d["tokens"])
    if d["tokens"]:
        lines.append(
            "per decode token: "
            f"compute {1000 * d['compute_s'] / n:.1f} ms, expert I/O wait {1000 * d['io_wait_s'] / n:.1f} ms, "
            f"host sync {1000 * d['sync_s'] / n:.1f} ms, "
            f"expert bytes {d['bytes_read'] / n / 2**20:.2f} MiB"
        )
    lines.append(f"expert cache hit rate: {100 * s['cache_hit_rate']:.1f}%, peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB")
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    """Print the memory plan of a model directory without loading its weights."""
    from engine.engine import measure_expert_read_speed
    from engine.model.loader import _load_tokenizer, inspect_experts, memory_budget_for, pick_device
    from engine.model.family_support import folder_support
    from engine.storage.packed_layout import open_packed_layout
    from engine.model.expert_parallel import ExpertParallel
    from engine.storage.rank_folder import read_rank_share
    from engine.model.plan import make_plan

    model_dir = Path(args.model).expanduser().resolve()
    family = folder_support(model_dir)
    if not args.json:  # before anything is built: whether this folder's family streams at all
        print(f"family: {family}", flush=True)
    device = pick_device(args.device)
    inspected = inspect_experts(model_dir, args.experts_per_token)
    layers = inspected.layers
    options = EngineOptions(cache_mb=args.cache_mb, memory_limit_mb=args.memory_limit_mb,
                            context_tokens=args.context_tokens, device=device)  # fmt: skip
    # the same budget a load would choose: a load has the tokenizer in memory when it measures the
    # runtime (about 0.2 GiB of the footprint), so the plan loads it too
    _load_tokenizer(model_dir, inspected.config)
    share = read_rank_share(model_dir)  # (a rank's share: its own experts, packed)
    budget = memory_budget_for(inspected, options, device,
                               ranks=share.ranks if share else ExpertParallel.ranks_in_environment())
    disk = measure_expert_read_speed(layers, io_threads=args.io_threads, samples=args.samples,
                                     packed=share.packed_layers(layers) if share else None)
    packed = share.packed_layers(layers) if share else open_packed_layout(model_dir, layers)
    plan = make_plan(
        model_type=inspected.config["model_type"],
        moe_layers=len(layers),
        experts_per_layer=layers[0].num_experts,
        k=inspected.k,
        trained_k=inspected.trained_k,
        dense_bytes=budget.needs.dense_bytes,
        expert_bytes_total=sum(l.expert_bytes * l.num_experts for l in layers),
        expert_bytes=layers[0].expert_bytes,
        budget=budget,
        disk_read_bytes_per_s=disk,
        layout="packed" if packed else "safetensors",
    )
    print(json.dumps({**plan.to_dict(), "family_support": family}, indent=2) if args.json else plan.describe())
    return 0


def cmd_pack(args: argparse.Namespace) -> int:
    """Write the packed expert layout (or, with --rank/--ranks, one rank's share) with a progress bar on stderr."""
    import time

    from engine.storage.pack import pack_model
    from engine.storage.rank_pack import pack_rank

    if (args.rank is None) != (args.ranks is None):
        raise MoeBarError("pack: give --rank and --ranks together (this machine's rank and how many there are)")
    if args.out and args.rank is None:
        raise MoeBarError("pack: --out is for a rank's share (with --rank and --ranks); a plain pack is written inside the model")

    t0 = time.perf_counter()

    def bar(done: int, total: int, written: int) -> None:
        width = 30
        fill = width * done // total
        rate = written / max(1e-9, time.perf_counter() - t0) / 1e9
        unit = "steps" if args.rank is not None else "layers"
        sys.stderr.write(f"\rpacking [{'#' * fill}{'.' * (width - fill)}] {done}/{total} {unit}, {rate:.2f} GB/s")
        sys.stderr.flush()

    try:
        if args.rank is not None:
            out = pack_rank(args.model, args.rank, args.ranks, args.out or None, io_threads=args.io_threads,
                            progress=None if args.quiet else bar)
        else:
            out = pack_model(args.model, io_threads=args.io_threads, progress=None if args.quiet else bar)
    finally:
        if not args.quiet:
            sys.stderr.write("\n")  # end the progress line, so an error starts a line of its own
    print(out)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Build the random-weight demo model."""
    from engine.demo.demo_model import build_demo_model

    out = build_demo_model(args.dir, preset=args.preset, overwrite=args.overwrite)
    print(out)
    print("note: the demo model's weights are random; it produces gibberish", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="moebar-engine", description=__doc__)
    parser.add_argument("--version", action="version", version=f"%(prog)s {moebar_version()}",
                        help="print the version and exit")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from a prompt")
    g.add_argument("model", help="model directory (an mlx-lm MoE model)")
    g.add_argument("--prompt", required=True, help="the text to continue (or, with --chat, the user message)")
    g.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    g.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (default 1.0: off)")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    g.add_argument("--chat", action="store_true", help="apply the model's chat template to the prompt")
    g.add_argument("--json", action="store_true", help="one JSON object per token, then the stats")
    g.add_argument("--timing", action="store_true", help="print where the time went (stderr)")
    g.add_argument("--trace", metavar="FILE", help="record each token's routed experts per layer (JSON lines)")
    _add_engine_options(g)
    g.set_defaults(func=cmd_generate)

    p = sub.add_parser("plan", help="memory plan and disk-bound tok/s of a model directory")
    p.add_argument("model", help="model directory (an mlx-lm MoE model)")
    _add_memory_options(p)
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="plan for this device (the CPU holds dense weights as fp32)")
    p.add_argument("--experts-per-token", type=int, default=None, help="plan for this K instead of the trained one")
    p.add_argument("--io-threads", type=int, default=4, help="parallel reads when measuring the disk")
    p.add_argument("--samples", type=int, default=32, help="experts read to measure the disk")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=cmd_plan)

    k = sub.add_parser(
        "pack", help="write one aligned blob per expert (one read per expert), or one rank's share of the model",
        description="Without --rank: write the packed expert layout inside the model folder. With --rank R "
                    "--ranks N: write a self-contained folder for rank R of N machines (expert parallelism): "
                    "config.json, the tokenizer, the dense weights and only the experts that rank owns (ids e "
                    "with e % N == R), so that Mac needs the dense part plus 1/N of the experts on its disk. Run "
                    "each rank on its own share, at the same path on every Mac.",
    )
    k.add_argument("model", help="model directory to pack (the packed file is written inside it)")
    k.add_argument("--rank", type=int, default=None, help="write the share of this rank (0-based; with --ranks)")
    k.add_argument("--ranks", type=int, default=None, help="how many ranks (machines) share the model (with --rank)")
    k.add_argument("--out", default="", metavar="DIR",
                   help="folder of the share (default: beside the model, MODEL-rankRofN); replaced if it is a share")
    k.add_argument("--io-threads", type=int, default=4, help="parallel reads and writes")
    k.add_argument("--quiet", action="store_true", help="no progress bar")
    k.set_defaults(func=cmd_pack)

    d = sub.add_parser("demo-model", help="build the random-weight demo model")
    d.add_argument("dir", help="folder to write the model into")
    d.add_argument("--preset", choices=["tiny", "small"], default="tiny", help="model size (default tiny)")
    d.add_argument("--overwrite", action="store_true", help="replace a model already in the folder")
    d.set_defaults(func=cmd_demo_model)

    for name, module, help_text in _DELEGATED:
        sp = sub.add_parser(name, help=help_text, add_help=False)
        sp.add_argument("rest", nargs=argparse.REMAINDER)
        sp.set_defaults(func=_delegate(module))
    return parser


# Subcommands whose arguments and code live in their own modules (imported only when run).
_DELEGATED = (
    ("stdio", "serving.stdio_server", "the JSON-lines protocol loop the app runs"),
    ("serve", "serving.http_server", "OpenAI-compatible HTTP server"),
    ("bench", "diagnostics.bench", "benchmark the engine against mlx-lm and the disk"),
    ("selfcheck", "diagnostics.selfcheck", "check this machine (exactness, slots, disk, memory); a report for bug reports"),
    ("cache-sim", "diagnostics.cache_sim", "replay a routing trace: hit rates of a cache policy, LRU and the optimum"),
    ("synth-trace", "diagnostics.synthetic_traces", "write a synthetic routing trace calibrated to published statistics"),
    ("bench-ranks", "diagnostics.ranks_bench", "communication cost of expert parallelism, on loopback ranks"),
)


def _delegate(module: str) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        import importlib

        return int(importlib.import_module(f"engine.{module}").main(args.rest) or 0)

    return run


def main(argv: list[str] | None = None) -> int:
    """Entry point: run a subcommand; user errors print one line and exit 2, never a traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    delegated = {name: module for name, module, _ in _DELEGATED}
    if argv and argv[0] in delegated:
        # these subcommands parse their own arguments (argparse's REMAINDER drops leading options)
        args = argparse.Namespace(func=_delegate(delegated[argv[0]]), rest=argv[1:])
    else:
        args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MoeBarError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if os.environ.get("MOEBAR_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set MOEBAR_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
