"""``moebar-engine selfcheck``: check this machine, print a short report to attach to a bug report.

Checks, each PASS / FAIL / SKIP with one line of detail:
- exactness: streamed generation equals mlx-lm's in-memory generation, token for token, with
  fp32 and with bf16 activations on the default device (a random model built on the spot: tiny
  on the CPU, real models' widths elsewhere; with a cache that hits and evicts), after mlx-lm's
  own generation is found finite and repeatable there;
- slot reuse: during a real generation with the smallest cache, no slot read by computation not
  yet evaluated is chosen for a new expert;
- row independence: on the CPU, one token's row of the expert matmul does not change with the
  other rows of its batch (bitwise), so chunked prefill equals token-by-token; on a GPU, where
  MLX picks kernels by shape and the engine uses mlx-lm's shapes, that a row does not change
  with its call's length within one kernel (bf16, a quantized linear layer and mlx-lm's experts);
- large array: ``gather_qmm`` reads the right slot across one stacked slot array as large as the
  engine makes on this backend (2 GiB on a GPU; a 4 GiB one read wrong slots on CUDA);
- disk: the cold read rate of a test file, that evicting its pages from the page cache works
  (the method this OS uses), and that the disk gauge's counters (the disk the folder maps to,
  on macOS the physical stores of its APFS volume) count that read;
- memory pressure: the gauge's reading comes from this OS's own source (macOS: the
  ``kern.memorystatus_vm_pressure_level`` sysctl; Linux: PSI, else available RAM);
- memory budget: the expert cache and limits it would choose (for ``--model`` or the test model).
Exit status 0 when nothing failed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROMPT_TOKENS = 40
GENERATED_TOKENS = 12
PREFILL_CHUNK = 16


@dataclass
class CheckResult:
    """One line of the report."""

    name: str
    status: str  # "PASS", "FAIL" or "SKIP"
    detail: str

    def line(self) -> str:
        """``PASS name: detail``."""
        return f"{self.status:4}  {self.name}: {self.detail}"


def _prompt() -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randrange(100, 50_000) for _ in range(PROMPT_TOKENS)]


def check_preset(on_cpu: bool | None = None) -> str:
    """The check model's preset: "tiny" on the CPU, "kernel-check" (real models' widths) elsewhere.

    A GPU's kernels are written for real widths; at the tiny preset's 64-wide layers MLX's CUDA
    backend gave NaN logits that changed between identical runs of mlx-lm alone.
    """
    if on_cpu is None:
        import mlx.core as mx

        on_cpu = mx.default_device() == mx.cpu
    return "tiny" if on_cpu else "kernel-check"


def build_check_model(root: Path) -> Path:
    """A random qwen3_moe model (4-bit, ``check_preset()``) with bf16 expert scales, as real 4-bit
    models store them: the fp32 checks then run the slots' widening to fp32, the bf16 ones none."""
    from engine.demo.demo_model import build_random_moe_model

    preset = check_preset()
    out = root / f"selfcheck-{preset}"
    if not (out / "config.json").is_file():
        build_random_moe_model(out, "qwen3_moe", 4, preset=preset, expert_scales_dtype="bfloat16")
    return out


def mlx_lm_tokens(model_dir: Path, prompt: list[int], n: int, dtype: str) -> tuple[list[int], bool]:
    """mlx-lm's greedy tokens for ``prompt`` with the whole model in memory, activations ``dtype``,
    and whether every step's logits were finite."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    model, _ = load_model(model_dir)
    model.set_dtype(mx.float32 if dtype == "float32" else mx.bfloat16)
    out, finite = [], True
    for token, logprobs in generate_step(mx.array(prompt), model, max_tokens=n, sampler=make_sampler(temp=0.0)):
        out.append(int(token))
        finite = finite and bool(mx.all(mx.isfinite(logprobs)).item())
    return out, finite


def reference_fault(first: tuple[list[int], bool], second: tuple[list[int], bool]) -> str | None:
    """Why two runs of mlx-lm alone cannot serve as the reference (non-finite logits, or tokens
    that differ between identical runs), or None when they can."""
    if not (first[1] and second[1]):
        return "mlx-lm's own logits are not finite (NaN or inf)"
    if first[0] != second[0]:
        return f"mlx-lm's own tokens differ between two identical runs ({first[0][:4]} vs {second[0][:4]})"
    return None


def streamed_tokens(model_dir: Path, prompt: list[int], n: int, dtype: str, cache_fraction: float) -> tuple[list[int], dict[str, int]]:
    """The engine's greedy tokens with activations ``dtype`` and a cache of that share of the experts."""
    from engine.engine import Engine
    from engine.model.loader import inspect_experts
    from engine.types import EngineOptions, SamplingParams

    layers = inspect_experts(model_dir).layers
    cache_mb = cache_fraction * sum(l.expert_bytes * l.num_experts for l in layers) / 2**20
    options = EngineOptions(cache_mb=cache_mb, activation_dtype=dtype, prefill_chunk=PREFILL_CHUNK)
    engine = Engine.load(model_dir, options, measure_disk=False)
    try:
        tokens = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=n))]
        return tokens, engine.expert_counters()
    finally:
        engine.close()


def check_exactness(root: Path, dtype: str) -> CheckResult:
    """Streamed tokens equal mlx-lm's at ``dtype`` on the default device, with hits and evictions."""
    import mlx.core as mx

    name = f"exactness {dtype} on {mx.default_device()}"
    model = build_check_model(root)
    prompt = _prompt()
    reference = mlx_lm_tokens(model, prompt, GENERATED_TOKENS, dtype)
    fault = reference_fault(reference, mlx_lm_tokens(model, prompt, GENERATED_TOKENS, dtype))
    if fault is not None:  # an MLX fault on this device: the engine cannot be judged against it
        return CheckResult(name, "FAIL", f"{fault} on the {check_preset()} model: a fault of MLX on this device, "
                                         "the engine not compared")  # fmt: skip
    want = reference[0]
    got, counters = streamed_tokens(model, prompt, GENERATED_TOKENS, dtype, cache_fraction=3 / 8)
    if got != want:
        first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        return CheckResult(name, "FAIL", f"token {first} differs: streamed {got[first:first + 4]} vs mlx-lm "
                                         f"{want[first:first + 4]} ({len(prompt)}-token prompt)")  # fmt: skip
    return CheckResult(name, "PASS", f"{len(got)} tokens equal mlx-lm's; cache {counters['cache_hits']} hits, "
                                     f"{counters['cache_misses']} misses")  # fmt: skip


def check_slot_reuse(root: Path) -> CheckResult:
    """No slot pinned by pending computation is ever given to another expert (smallest cache)."""
    from engine.engine import Engine
    from engine.types import EngineOptions, SamplingParams

    model = build_check_model(root)
    engine = Engine.load(model, EngineOptions(cache_mb=0, prefill_chunk=PREFILL_CHUNK), measure_disk=False)
    streamer = engine._loaded.streamer
    evictions, violations = 0, []

    def watch(cache: Any) -> Callable[[tuple[int, int], set[tuple[int, int]]], int]:
        assign = cache.assign

        def checked(key: tuple[int, int], pinned: set[tuple[int, int]]) -> int:
            nonlocal evictions
            before = dict(cache._slot_of)
            slot = assign(key, pinned)
            owner = next((k for k, s in before.items() if s == slot), None)
            if owner is not None:
                evictions += 1
                if owner in streamer._pinned:
                    violations.append((owner, key, slot))
            return int(slot)

        return checked

    for cache in streamer.caches:
        setattr(cache, "assign", watch(cache))  # this engine's caches only; closed below
    try:
        list(engine.generate(_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS)))
    finally:
        engine.close()
    if violations:
        owner, key, slot = violations[0]
        return CheckResult("slot reuse", "FAIL", f"slot {slot} of pinned expert {owner} given to {key} "
                                                 f"({len(violations)} times)")  # fmt: skip
    if evictions == 0:
        return CheckResult("slot reuse", "FAIL", "the smallest cache never evicted: the check proved nothing")
    return CheckResult("slot reuse", "PASS", f"{evictions} evictions, none of a slot pending computation reads")


def check_row_independence(root: Path, backend_name: str | None = None) -> CheckResult:
    """A token's row of the expert matmul against the rest of its call (what the engine relies on).

    On the CPU the row must be bitwise the same alone and in a batch (chunked prefill equals
    token by token). Where MLX picks kernels by shape (a GPU) rows alone and batched may differ,
    and the engine calls the kernels with mlx-lm's shapes instead (engine.model.kernel_shapes);
    what it relies on there is that within one kernel a row does not depend on the call's
    length (engine.diagnostics.row_length_check).
    """
    import mlx.core as mx
    from mlx_lm.utils import load_model

    from engine.diagnostics.row_length_check import check_row_length
    from engine.model.array_limits import backend
    from engine.model.kernel_shapes import rows_independent
    from engine.model.loader import inspect_experts

    model_dir = build_check_model(root)
    layers = inspect_experts(model_dir).layers
    model, _ = load_model(model_dir)
    switch = next(m for path, m in model.named_modules() if path == layers[0].module_path)
    gate = switch.gate_proj
    hidden = int(gate.weight.shape[-1]) * 32 // int(getattr(gate, "bits", 32))
    mx.random.seed(0)
    n, k = 24, 4
    x = mx.random.normal((n, hidden))
    idx = mx.random.randint(0, layers[0].num_experts, (n, k)).astype(mx.uint32)
    batch = switch(x, idx)
    alone = mx.concatenate([switch(x[i : i + 1], idx[i : i + 1]) for i in range(n)])
    mx.eval(batch, alone)
    if rows_independent(backend_name or backend()):
        if not bool(mx.array_equal(batch, alone)):
            diff = float(mx.max(mx.abs(batch - alone)))
            return CheckResult("row independence", "FAIL", f"rows differ with their batch (max |diff| {diff:.3g})")
        return CheckResult("row independence", "PASS", f"{n} rows x top-{k} bitwise equal alone and batched")
    alone_diff = float(mx.max(mx.abs(batch - alone)))
    for r in check_row_length():
        if r.rows is not None:
            return CheckResult("row independence", "FAIL", f"{r.what}: rows change with their call's length ({r.rows} against "
                                                           f"{r.against} rows, max |diff| "
                                                           f"{r.max_abs_diff:.3g}): long prompts may not give mlx-lm's tokens")  # fmt: skip
    return CheckResult("row independence", "PASS", f"rows alone and batched differ by {alone_diff:.3g} (MLX picks kernels by shape: "
                                                   "the engine uses mlx-lm's shapes); within a kernel, bf16 rows equal in calls of "
                                                   "8 to 2,048 rows (quantized linear) and 16 to 64 tokens (experts)")  # fmt: skip


def check_large_array() -> CheckResult:
    """gather_qmm reads the right slot across one stacked array as large as the engine makes here."""
    import psutil

    from engine.diagnostics.large_array_check import array_bytes_to_check, check_stacked_array
    from engine.model.array_limits import backend, max_array_bytes

    where = backend()
    size, why = array_bytes_to_check(where, max_array_bytes(where), int(psutil.virtual_memory().available))
    r = check_stacked_array(size)
    what = f"{r.array_bytes / 2**30:.2f} GiB of 4-bit slots ({r.slots}), {r.probed} probed ({why})"
    if r.wrong:
        return CheckResult("large array", "FAIL", f"{what}: slots {r.wrong[:6]} read wrong (max |diff| "
                                                  f"{r.max_abs_diff:.3g}); report this with the MLX version")  # fmt: skip
    return CheckResult("large array", "PASS", f"{what}: every probe equals its slot's own matmul")


def check_disk(directory: Path, size: int = 64 << 20) -> CheckResult:
    """Cold read rate of a test file in ``directory``, and that evicting its cached pages works."""
    from engine.platform.page_cache import cached_fraction, eviction_method
    from engine.platform_info import disk_read_counters, drop_file_cache, measure_cold_read_speed

    method = eviction_method()
    with tempfile.TemporaryDirectory(dir=directory, prefix="moebar-selfcheck-") as tmp:
        path = Path(tmp) / "blob"
        with open(path, "wb") as f:
            for _ in range(size // (4 << 20)):
                f.write(os.urandom(4 << 20))
            f.flush()
            os.fsync(f.fileno())
        path.read_bytes()  # now in the page cache
        before = cached_fraction(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            dropped = drop_file_cache(fd)
        finally:
            os.close(fd)
        after = cached_fraction(path)
        counters_before = disk_read_counters(path)
        rate = measure_cold_read_speed(path, block_bytes=1 << 20, threads=4, total_bytes=size)
        counters_after = disk_read_counters(path)
    figures = f"cold read {rate / 1e9:.2f} GB/s; eviction by {method}: cached {before:.0%} -> {after:.0%}"
    if before < 0.5:
        return CheckResult("disk", "SKIP", f"{figures} (this filesystem keeps no page cache to evict)")
    if not dropped or after > 0.1:
        return CheckResult("disk", "FAIL", f"{figures}: eviction did not work, cold figures would be warm")
    gauge = disk_gauge_verdict(counters_before.disk, counters_after.read_bytes - counters_before.read_bytes, size)
    return CheckResult("disk", "FAIL" if gauge.startswith("FAIL") else "PASS", f"{figures}; {gauge.removeprefix('FAIL ')}")


def check_read_pieces(directory: Path) -> CheckResult:
    """Layer-shaped reads on this disk, whole experts against pieces: the engine's default for each."""
    from engine.diagnostics.read_pieces_check import compare_read_pieces

    c = compare_read_pieces(directory)
    gb = 1e9
    figures = (f"{c.experts_per_batch} experts of 6.75 MiB at a time on {c.threads} threads, pieces / whole: "
               f"cold {c.pieces / gb:.2f} / {c.whole / gb:.2f} GB/s ({c.ratio:.2f}x), through the page cache "
               f"{c.buffered_pieces / gb:.2f} / {c.buffered_whole / gb:.2f} ({c.buffered_ratio:.2f}x), from it "
               f"{c.hot_pieces / gb:.1f} / {c.hot_whole / gb:.1f} ({c.hot_ratio:.2f}x)")
    # a measurement, not a fault: what suits this disk. Cold mode measures both at each load and
    # keeps the faster (engine.storage.read_choice); reads through the page cache stay whole.
    hints = []
    if c.ratio < 0.95:
        hints.append("whole cold reads are faster here (cold mode measures both at each load and keeps the faster)")
    if c.buffered_ratio > 1.05 and c.hot_ratio > 0.95:
        hints.append("pieces are faster through the page cache here: --read-piece-kb 1024")
    return CheckResult("disk read pieces", "PASS", f"{figures}; " + ("; ".join(hints) or "the defaults suit this disk"))


def disk_gauge_verdict(disk: str | None, counted: int, read: int) -> str:
    """Whether the disk gauge saw a cold read of ``read`` bytes (``counted`` by disk ``disk``).

    Returns a phrase for the report, starting with ``FAIL`` when the gauge would mislead: no disk
    found for the folder (all disks would be summed) or its counters missed most of the read.
    """
    mib = 2**20
    if disk is None:
        return (f"FAIL disk gauge: no disk found for this folder, the gauge sums every disk "
                f"({counted / mib:.0f} MiB counted of {read / mib:.0f} MiB read)")
    if counted < read // 2:
        return f"FAIL disk gauge: {disk} counted only {counted / mib:.0f} MiB of the {read / mib:.0f} MiB read"
    return f"disk gauge: {disk} counted {counted / mib:.0f} MiB of {read / mib:.0f} MiB read"


def check_memory_pressure(platform: str = sys.platform) -> CheckResult:
    """The memory-pressure gauge's reading, and that it comes from this OS's own source."""
    from engine.platform_info import MACOS_PRESSURE_SYSCTL, PSI_PATH, memory_pressure

    reading = memory_pressure(platform)
    detail = f"{reading.level} (raw {reading.raw:g} from {reading.source}{'; ' + reading.detail if reading.detail else ''})"
    if platform == "darwin" and reading.source != MACOS_PRESSURE_SYSCTL:
        return CheckResult("memory pressure", "FAIL", f"{detail}: the sysctl {MACOS_PRESSURE_SYSCTL} could not be read")
    if platform.startswith("linux") and reading.source != str(PSI_PATH):
        return CheckResult("memory pressure", "PASS", f"{detail} (this kernel has no PSI; available RAM stands in)")
    return CheckResult("memory pressure", "PASS", detail)


def check_budget(model_dir: Path) -> CheckResult:
    """The memory budget a load of ``model_dir`` would choose on this machine."""
    import mlx.core as mx

    from engine.model.loader import inspect_experts, memory_budget_for
    from engine.types import EngineOptions

    device = "gpu" if mx.default_device() == mx.gpu else "cpu"
    b = memory_budget_for(inspect_experts(model_dir), EngineOptions(cache_mb=None), device)
    gib = 2**30
    return CheckResult("memory budget", "PASS",
                       f"{model_dir.name}: expert cache {b.cache_bytes / 2**20:.0f} MiB ({b.mode}: {b.reason}); "
                       f"footprint {b.footprint_bytes / gib:.2f} GiB; page cache keeps "
                       f"{b.page_cache_reserve_bytes / gib:.2f} GiB; MLX limit {b.mlx_memory_limit_bytes / gib:.2f} GiB, "
                       f"MLX cache limit {b.mlx_cache_limit_bytes / 2**20:.0f} MiB")  # fmt: skip


def _guard(name: str, fn: Callable[[], CheckResult]) -> CheckResult:
    try:
        return fn()
    except Exception as e:  # a check that crashes is a failure to report, not a traceback
        return CheckResult(name, "FAIL", f"{type(e).__name__}: {e}")


def run_selfcheck(work_dir: Path, disk_dir: Path, model_dir: Path | None, skip: set[str] = frozenset()) -> list[CheckResult]:  # type: ignore[assignment]
    """Run every check (those named in ``skip`` are reported as skipped) and return the results."""
    checks: list[tuple[str, Callable[[], CheckResult]]] = [
        ("exactness float32", lambda: check_exactness(work_dir, "float32")),
        ("exactness bfloat16", lambda: check_exactness(work_dir, "bfloat16")),
        ("slot reuse", lambda: check_slot_reuse(work_dir)),
        ("row independence", lambda: check_row_independence(work_dir)),
        ("large array", check_large_array),
        ("disk", lambda: check_disk(disk_dir)),
        ("disk read pieces", lambda: check_read_pieces(disk_dir)),
        ("memory pressure", check_memory_pressure),
        ("memory budget", lambda: check_budget(model_dir or build_check_model(work_dir))),
    ]
    results = []
    for name, fn in checks:
        if name.split()[0] in skip or name in skip:
            results.append(CheckResult(name, "SKIP", "skipped on request"))
            continue
        print(f"selfcheck: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        r = _guard(name, fn)
        r.detail += f" [{time.perf_counter() - t0:.1f} s]"
        results.append(r)
    return results


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def header() -> list[str]:
    """Machine and versions, the report's first lines."""
    import mlx.core as mx

    from engine.cli import moebar_version
    from engine.platform_info import memory_info

    ram = memory_info()
    return [
        f"MoeBar selfcheck, {moebar_version()}",
        f"{platform.platform()}, {platform.machine()}, Python {platform.python_version()}",
        f"MLX {_version('mlx')}, mlx-lm {_version('mlx-lm')}, default device {mx.default_device()}",
        f"RAM {ram.total_bytes / 2**30:.1f} GiB total, {ram.available_bytes / 2**30:.1f} GiB available",
    ]


def build_parser() -> argparse.ArgumentParser:
    """Arguments of ``moebar-engine selfcheck``."""
    p = argparse.ArgumentParser(prog="moebar-engine selfcheck", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="also report the memory budget of this model directory")
    p.add_argument("--disk-dir", default=None,
                   help="folder for the disk check (default: the model's folder, else the temp folder)")
    p.add_argument("--work-dir", default=None, help="where the test models are built (default: a temp folder)")
    p.add_argument("--skip", action="append", default=[], choices=["exactness", "slot", "row", "disk", "memory"],  # memory: both memory checks
                   help="skip a check (repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                   help="where the checks compute (auto: the GPU when MLX has one)")
    return p


def main(argv: list[str] | None = None) -> int:
    """Run the checks, print the report on stdout; exit 1 when any check failed."""
    from engine.model.loader import pick_device

    args = build_parser().parse_args(argv)
    pick_device(args.device)
    model_dir = Path(args.model).expanduser().resolve() if args.model else None
    disk_dir = Path(args.disk_dir) if args.disk_dir else (model_dir or Path(tempfile.gettempdir()))
    with tempfile.TemporaryDirectory(prefix="moebar-selfcheck-") as tmp:
        work = Path(args.work_dir) if args.work_dir else Path(tmp)
        results = run_selfcheck(work, disk_dir, model_dir, set(args.skip))
    failed = [r for r in results if r.status == "FAIL"]
    lines = header() + [r.line() for r in results]
    lines.append(f"result: {'FAILED (' + str(len(failed)) + ' of ' + str(len(results)) + ')' if failed else 'all checks passed'}")
    print("\n".join(lines))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
