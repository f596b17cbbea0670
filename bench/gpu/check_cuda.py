"""Checks and micro-timings of the engine on MLX's CUDA backend, before the full benchmark.

1. Slot pools: a host write through a pool's NumPy view lands in the array the GPU reads,
   also after the GPU has read the slot (MLX moves an array to CUDA managed memory when the host
   takes its pointer, so pages migrate between host and device on access).
2. What that costs: writing a layer's worth of experts (K slots) from the host, and the GPU's
   first and second read of them afterwards; and the same with the pool's pages advised to stay
   on the host (``cudaMemAdvise`` through the CUDA runtime MLX loaded), for comparison.
3. The latency of one host synchronisation (``mx.eval`` of a small op).
4. End to end on a tiny model: streamed greedy tokens equal mlx-lm's on the GPU with no cache,
   with every expert preloaded (device routing) and with that cache forced through the host path;
   the activation dtype is the model's.

Writes a JSON summary (``--json``) and exits non-zero when a correctness check fails.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.model.expert_cache import SlotPool
from engine.storage.expert_layout import ExpertParam

# One expert of the qwen3-30b-shape preset: gate/up/down, 4-bit, group 64, bf16 scales and biases.
EXPERT_PARAMS = [
    ExpertParam(f"{proj}.{name}", dtype, shape, nbytes)
    for proj in ("gate_proj", "up_proj", "down_proj")
    for name, dtype, shape, nbytes in (
        ("weight", "U32", (768, 256), 786432),
        ("scales", "BF16", (768, 32), 49152),
        ("biases", "BF16", (768, 32), 49152),
    )
]
K = 8


def _gpu_bytes(pool: SlotPool, slot: int) -> bytes:
    """The bytes of ``slot`` as a GPU computation sees them (copied back after a GPU op)."""
    parts = []
    for p in pool.params:
        raw = mx.view(pool.arrays[p.key], mx.uint8)[slot]
        parts.append(np.array(raw + mx.zeros_like(raw)).tobytes())  # integer add: bits kept
    return b"".join(parts)


def check_shared(pool: SlotPool, rng: np.random.Generator) -> dict[str, Any]:
    """Host writes before and after a GPU read of the same slot are both seen by the GPU."""
    out: dict[str, Any] = {}
    for round_ in ("fresh", "after_gpu_read"):
        want = []
        for dest in pool.dests(1):
            data = rng.integers(0, 255, dest.nbytes, dtype=np.uint8)
            dest[:] = data
            want.append(data.tobytes())
        out[round_] = _gpu_bytes(pool, 1) == b"".join(want)
    return out


def _sum_slots(pool: SlotPool, n: int) -> None:
    """A GPU op that reads every byte of slots ``0..n-1`` of every parameter."""
    mx.eval([mx.sum(mx.view(pool.arrays[p.key][:n], mx.uint8).astype(mx.uint32)) for p in pool.params])


def time_pool(pool: SlotPool, rng: np.random.Generator, repeats: int = 5) -> dict[str, float]:
    """Median seconds: host write of K slots (pages last read by the GPU), then two GPU reads."""
    src = [rng.integers(0, 255, d.nbytes, dtype=np.uint8) for d in pool.dests(0)]
    write, first, second = [], [], []
    for _ in range(repeats):
        _sum_slots(pool, K)  # pages were just used by the GPU, as in decode
        t0 = time.perf_counter()
        for s in range(K):
            for dest, data in zip(pool.dests(s), src):
                dest[:] = data
        t1 = time.perf_counter()
        _sum_slots(pool, K)
        t2 = time.perf_counter()
        _sum_slots(pool, K)
        t3 = time.perf_counter()
        write.append(t1 - t0)
        first.append(t2 - t1)
        second.append(t3 - t2)
    nbytes = K * sum(p.nbytes for p in pool.params)
    return {
        "bytes": nbytes,
        "host_write_s": float(np.median(write)),
        "gpu_first_read_s": float(np.median(first)),
        "gpu_second_read_s": float(np.median(second)),
        "host_write_bytes_per_s": nbytes / float(np.median(write)),
    }


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


def advise_host(pool: SlotPool) -> None:
    """Ask CUDA to keep the pool's pages on the host and map them for GPU 0 (no migration)."""
    rt = ctypes.CDLL("libcudart.so.13")  # already loaded by MLX: the same runtime
    rt.cudaMemAdvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, _MemLocation]
    set_preferred, set_accessed_by, loc_device, loc_host = 3, 5, 1, 2
    for view in pool._views:
        ptr, size = view.ctypes.data, view.nbytes
        for advice, loc in ((set_preferred, _MemLocation(loc_host, 0)), (set_accessed_by, _MemLocation(loc_device, 0))):
            err = rt.cudaMemAdvise(ptr, size, advice, loc)
            if err != 0:
                raise RuntimeError(f"cudaMemAdvise({advice}) returned {err}")


def sync_latency(n: int = 200) -> float:
    """Median seconds of one ``mx.eval`` of a tiny op on the default device."""
    x = mx.ones((1, 2048))
    w = mx.ones((2048, 128))
    mx.eval(x @ w)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        mx.eval(mx.argmax(x @ w, axis=-1))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def end_to_end(work: Path, device: str, model_dir: Path | None = None) -> dict[str, Any]:
    """Streamed logits and tokens against mlx-lm's, on ``model_dir`` (or a tiny model built in ``work``).

    The same full-prompt forward pass runs in both (the same kernels on the same rows but for the
    expert arrays' layout); mlx-lm is also run twice against itself, to tell kernel
    non-determinism from an engine error. Greedy tokens are compared for three cache settings.
    """
    from mlx_lm import load as mlx_load
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from engine.demo.demo_model import build_random_moe_model
    from engine.engine import Engine
    from engine.model.loader import inspect_experts
    from engine.model.memory_budget import every_expert_cache_mb
    from engine.types import EngineOptions, SamplingParams

    path = model_dir or build_random_moe_model(work / "tiny", "qwen3_moe", 4)
    model, tok = mlx_load(str(path))[:2]
    prompt = tok.encode("Streaming experts from the disk on a GPU", add_special_tokens=False)

    def logits(m: Any, cache: Any) -> np.ndarray:
        out = m(mx.array(prompt)[None], cache=cache)[0, -1].astype(mx.float32)
        return np.array(out)

    def greedy(n: int = 12) -> list[int]:
        return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0))]

    from mlx_lm.models.cache import make_prompt_cache

    ref_logits = [logits(model, make_prompt_cache(model)) for _ in range(2)]
    ref = greedy()
    out: dict[str, Any] = {
        "mlx_lm_repeat_max_abs_logit_diff": float(np.max(np.abs(ref_logits[0] - ref_logits[1]))),
        "mlx_lm_repeat_same_tokens": greedy() == ref,
        "logit_scale": float(np.max(np.abs(ref_logits[0]))),
    }
    total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)
    for name, cache_mb, preload, routing in (
        ("cache_zero", 0.0, False, True),
        ("preloaded_device_routing", every_expert_cache_mb(total), True, True),
        ("preloaded_host_sync", every_expert_cache_mb(total), True, False),
    ):
        engine = Engine.load(path, EngineOptions(cache_mb=cache_mb, device=device), measure_disk=False)
        try:
            if preload:
                engine.preload_experts()
            engine.set_device_routing(routing)
            got_logits = logits(engine.model, engine.make_kv_cache())
            engine._loaded.streamer.release_pins()
            got = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=len(ref)))]
            out[name] = {
                "max_abs_logit_diff": float(np.max(np.abs(got_logits - ref_logits[0]))),
                "same_argmax": int(np.argmax(got_logits)) == int(np.argmax(ref_logits[0])),
                "same_tokens": got == ref,
                "first_divergence": next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None),
                "activation_dtype": engine._loaded.activation_dtype,
                "counters": engine.expert_counters(),
            }
        finally:
            engine.close()
    return out


def main() -> int:
    """Run the checks, print and write the summary; non-zero when a check fails."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu", help="cpu: a smoke test off the GPU")
    ap.add_argument("--model", default=None, help="check exactness on this model (default: a tiny one)")
    ap.add_argument("--exactness-only", action="store_true", help="skip the slot-pool timings")
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    rng = np.random.default_rng(0)
    r: dict[str, Any] = {
        "mlx": getattr(mx, "__version__", "?"),
        "cuda_available": bool(mx.cuda.is_available()),  # type: ignore[attr-defined]
        "default_device": str(mx.default_device()),
    }
    pool = SlotPool(EXPERT_PARAMS, 2 * K)  # raises if the NumPy views do not share memory
    r["shared_memory"] = check_shared(pool, rng)
    if not args.exactness_only:
        r["managed_default"] = time_pool(pool, rng)
        try:
            advised = SlotPool(EXPERT_PARAMS, 2 * K)
            advise_host(advised)
            r["managed_host_preferred"] = time_pool(advised, rng)
            r["shared_memory_host_preferred"] = check_shared(advised, rng)
        except (OSError, RuntimeError) as e:
            r["managed_host_preferred"] = {"error": str(e)}
        r["sync_latency_s"] = sync_latency()
    del pool
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        r["end_to_end"] = end_to_end(Path(tmp), args.device, Path(args.model) if args.model else None)
    r["end_to_end_s"] = time.perf_counter() - t0
    print(json.dumps(r, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    ok = all(r["shared_memory"].values()) and all(
        v["same_tokens"] for v in r["end_to_end"].values() if isinstance(v, dict)
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
