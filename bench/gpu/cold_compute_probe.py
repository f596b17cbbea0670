"""Where a cold decode token's compute goes on CUDA: experts read by the GPU in host memory.

The seventh session's H100 run found cold decode computing 44 ms a token against 8 ms with every
expert in GPU memory, at Qwen3.5-397B's expert shape (4 layers, K = 10: 283 MB of experts a
token), and the 6.7 ms the GPU's reads of host-resident slots should cost at 42 GB/s explain
little of it. This probe times the parts apart, on the engine's own ``SlotPool``, without a model
or a disk: one pool slot per (layer, routed expert), filled from NumPy as the I/O threads fill it.

Per "token" (``--layers`` MoE layers of ``--k`` experts, an eval after each layer as the engine's
routing sync does), median of ``--repeats``:

- ``host_write``: the host's copies of a token's experts into the pool (pages kept on the host,
  mapped for the GPU: ``prefer_host``), against the same copies into plain NumPy memory;
- ``host_resident``: the experts' ``gather_qmm`` calls reading the slots where they are (the
  engine's cold path), after the host wrote them (``rewritten``) and with nothing written since
  the last token (``unwritten``);
- ``gathered_first``: the token's slots copied into a compact device array by ``mx.take`` (one
  bulk read over the host link), then the same calls on the copy: a candidate fix;
- ``device_resident``: the same calls after the pool's pages moved to GPU memory (``to_device``):
  what the warm engine computes;
- ``plain_device``: the same calls on arrays MLX made on the GPU and the host never touched
  (not managed memory: what mlx-lm's weights are). Against ``device_resident`` it says what
  managed memory costs once its pages are on the GPU, for the warm engine too (0.87 of mlx-lm).

``--pool-slots``: a pool larger than one token's experts, with the token's slots drawn across it
(the warm 4-layer pools hold 1,024 slots, 7.2 GB, and a token reads 40 of them): where the
pages' mapping granularity matters, the spread is what shows it.

And one exactness check: slots the GPU has read are written again by the host with other experts
(two sets, alternating, ``--rewrite-rounds`` times) and computed in place; each output must equal,
bit for bit, the same call on a fresh copy of the slots' bytes. A GPU that kept lines of the old
experts cached would compute a slightly wrong expert (the suspect for the one bf16 row that still
differs from mlx-lm: qwen3_moe with no cache, whose 4 slots are rewritten every token).

Off CUDA nothing is placed and every variant reads the same memory (a smoke test of the script).

Usage: python bench/gpu/cold_compute_probe.py [--layers 4] [--k 10] [--repeats 7] --out DIR
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import engine  # noqa: F401  (before mlx: the fast BLAS, see engine.fast_blas)
import mlx.core as mx
import numpy as np

from engine.model import cuda_memory
from engine.model.expert_cache import SlotPool
from engine.storage.expert_layout import ExpertParam

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def expert_params(hidden: int, inner: int, bits: int, group: int) -> list[ExpertParam]:
    """One SwitchGLU expert's quantized parameters (bf16 scales and biases, as mlx-community's)."""
    params = []
    for proj in PROJECTIONS:
        rows, cols = (hidden, inner) if proj == "down_proj" else (inner, hidden)
        packed = (rows, cols * bits // 32)
        groups = (rows, cols // group)
        params.append(ExpertParam(f"{proj}.weight", "U32", packed, 4 * packed[0] * packed[1]))
        for kind in ("scales", "biases"):
            params.append(ExpertParam(f"{proj}.{kind}", "BF16", groups, 2 * groups[0] * groups[1]))
    return params


def random_experts(params: list[ExpertParam], n: int, seed: int = 0) -> list[list[np.ndarray]]:
    """``n`` experts' bytes, per parameter: random codes, small finite scales and biases."""
    rng = np.random.default_rng(seed)
    experts = []
    for _ in range(n):
        blobs = []
        for p in params:
            if p.dtype == "U32":
                blobs.append(rng.integers(0, 256, p.nbytes, dtype=np.uint8))
            else:
                values = mx.array(rng.uniform(-0.02, 0.02, p.nbytes // 2).astype(np.float32)).astype(mx.bfloat16)
                blobs.append(np.array(mx.view(values, mx.uint8)))
        experts.append(blobs)
    return experts


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    """Median wall time of ``fn`` in milliseconds, after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inner", type=int, default=1024)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rewrite-rounds", type=int, default=12)
    p.add_argument("--pool-slots", type=int, default=0, help="slots in the pool (0: one token's, layers x k)")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    params = expert_params(args.hidden, args.inner, args.bits, args.group)
    n = args.layers * args.k
    n_slots = max(n, args.pool_slots)
    pool = SlotPool(params, n_slots)
    placed = pool.prefer_host()
    used = sorted(np.random.default_rng(0).choice(n_slots, n, replace=False).tolist())  # the token's slots
    blobs = random_experts(params, n)
    plain = [[np.empty_like(b) for b in e] for e in blobs]
    views = [pool.dests(s) for s in used]
    expert_mb = sum(q.nbytes for q in params) / 1e6

    def write(targets: list[list[Any]]) -> None:
        for e, dests in enumerate(targets):
            for src, dst in zip(blobs[e], dests):
                np.copyto(dst, src)

    x = mx.random.normal((1, 1, 1, 1, args.hidden)).astype(mx.bfloat16)
    mx.eval(x)

    def experts_of(arrays: dict[str, mx.array], idx: mx.array) -> mx.array:
        def proj(name: str, h: mx.array) -> mx.array:
            return mx.gather_qmm(h, arrays[f"{name}.weight"], arrays[f"{name}.scales"], arrays[f"{name}.biases"],
                                 rhs_indices=idx, transpose=True, group_size=args.group, bits=args.bits)  # fmt: skip
        h = mx.sigmoid(g := proj("gate_proj", x)) * g * proj("up_proj", x)
        return proj("down_proj", h)

    layer_idx = [mx.array(used[l * args.k : (l + 1) * args.k], dtype=mx.uint32).reshape(1, 1, -1)
                 for l in range(args.layers)]  # fmt: skip
    compact_idx = mx.arange(args.k, dtype=mx.uint32).reshape(1, 1, -1)
    mx.eval(layer_idx, compact_idx)

    def compute_on(arrays: dict[str, mx.array]) -> None:
        for idx in layer_idx:
            mx.eval(experts_of(arrays, idx))  # one sync a layer, as the routing sync

    def compute_in_place() -> None:
        compute_on(pool.arrays)

    def compute_gathered() -> None:
        for idx in layer_idx:
            slots = idx.reshape(-1)
            compact = {k: mx.take(a, slots, axis=0) for k, a in pool.arrays.items()}
            mx.eval(experts_of(compact, compact_idx))

    def rewrite_and_compute() -> None:
        write(views)
        compute_in_place()

    def rewrite_and_gather() -> None:
        write(views)
        compute_gathered()

    write(views)
    result: dict[str, Any] = {
        "device": str(mx.default_device()),
        "cuda_placement": placed,
        "layers": args.layers,
        "k": args.k,
        "expert_mb": expert_mb,
        "token_mb": expert_mb * n,
        "host_write_plain_ms": median_ms(lambda: write(plain), args.repeats),
        "host_write_pool_ms": median_ms(lambda: write(views), args.repeats),
        "host_resident_unwritten_ms": median_ms(compute_in_place, args.repeats),
        "host_resident_rewritten_ms": median_ms(rewrite_and_compute, args.repeats),
        "gathered_first_unwritten_ms": median_ms(compute_gathered, args.repeats),
        "gathered_first_rewritten_ms": median_ms(rewrite_and_gather, args.repeats),
    }
    result["host_write_pool_gbps"] = result["token_mb"] / result["host_write_pool_ms"]  # MB/ms = GB/s
    moved = pool.slots_to_device(wait=True)
    result["moved_to_device"] = moved
    result["device_resident_ms"] = median_ms(compute_in_place, args.repeats)
    made_on_device = device_arrays(pool)
    result["plain_device_ms"] = median_ms(lambda: compute_on(made_on_device), args.repeats)
    del made_on_device
    same = compute_outputs_equal(pool, layer_idx, compact_idx, experts_of)
    result["gathered_equals_in_place"] = same
    other = random_experts(params, n, seed=1)
    fresh_pool = SlotPool(params, n)  # (the check writes the token's experts into slots 0..n-1)
    in_order = [mx.arange(l * args.k, (l + 1) * args.k, dtype=mx.uint32).reshape(1, 1, -1) for l in range(args.layers)]
    mismatches = rewrite_mismatches(fresh_pool, [blobs, other], in_order, experts_of, args.rewrite_rounds)
    result["rewrite_rounds"] = args.rewrite_rounds
    result["rewrite_mismatches"] = mismatches  # (round, layer, max |diff|) of outputs that differed
    same = same and not mismatches
    (out / "cold_compute_probe.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if cuda_memory.active():
        print(f"GPU reads of host-resident slots: {result['host_resident_unwritten_ms'] - result['device_resident_ms']:.1f} ms "
              f"a token over the device-resident floor ({result['token_mb']:.0f} MB)")  # fmt: skip
    return 0 if same else 1


def device_arrays(pool: SlotPool) -> dict[str, mx.array]:
    """Arrays shaped as the pool's, filled by MLX on the default device (never host-touched)."""
    out = {}
    for key, arr in pool.arrays.items():
        if arr.dtype == mx.uint32:
            made = mx.random.randint(0, 2**31 - 1, arr.shape).astype(mx.uint32)
        else:
            made = mx.random.uniform(-0.02, 0.02, arr.shape).astype(arr.dtype)
        mx.eval(made)
        out[key] = made
    return out


def compute_outputs_equal(pool: SlotPool, layer_idx: list[mx.array], compact_idx: mx.array,
                          experts_of: Callable[[dict[str, mx.array], mx.array], mx.array]) -> bool:  # fmt: skip
    """Whether computing on a gathered copy gives the in-place call's output bit for bit."""
    for idx in layer_idx:
        compact = {k: mx.take(a, idx.reshape(-1), axis=0) for k, a in pool.arrays.items()}
        a, b = experts_of(pool.arrays, idx), experts_of(compact, compact_idx)
        if not mx.array_equal(a, b).item():
            return False
    return True


def rewrite_mismatches(pool: SlotPool, sets: list[list[list[np.ndarray]]], layer_idx: list[mx.array],
                       experts_of: Callable[[dict[str, mx.array], mx.array], mx.array],
                       rounds: int) -> list[tuple[int, int, float]]:  # fmt: skip
    """Write the sets into the slots in turn, compute in place, compare with a fresh array made
    from the same bytes (what the host meant the slots to hold).

    The slots' pages stay where the probe left them (GPU memory after ``device_resident``); the
    pool is put back on the host first, as a streaming pool is.
    """
    pool.prefer_host()
    bad: list[tuple[int, int, float]] = []
    for r in range(rounds):
        experts = sets[r % len(sets)]
        for slot, blob in enumerate(experts):
            for src, dst in zip(blob, pool.dests(slot)):
                np.copyto(dst, src)
        fresh = {}
        for i, q in enumerate(pool.params):
            arr = pool.arrays[q.key]
            stacked = np.concatenate([blob[i] for blob in experts])
            fresh[q.key] = mx.view(mx.array(stacked), arr.dtype).reshape(arr.shape)
        for l, idx in enumerate(layer_idx):
            a, b = experts_of(pool.arrays, idx), experts_of(fresh, idx)
            if not mx.array_equal(a, b).item():
                diff = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
                bad.append((r, l, float(diff)))
    return bad


if __name__ == "__main__":
    raise SystemExit(main())
