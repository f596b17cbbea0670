"""Does MLX's quantized gather-matmul read the right expert from a stacked array of several GiB?

Seen at Qwen3.5-397B's shape on the lent H200 (MLX 0.32.4, CUDA): with one slot pool of 2,048
experts (4 GiB per stacked weight array) the engine's logits were 1.02 off mlx-lm's; split into
pools of at most 1,024 slots (2 GiB) they were exact. This script looks for the cause against
plain MLX, without the engine:

- a stacked ``[S, 1024, 4096 * bits / 32]`` uint32 weight (2 MiB a slot at 4 bits, one
  Qwen3.5-397B expert projection) with bf16 scales and biases, for S giving the sizes in GiB of
  ``--sizes``, at 4 and 8 bits (``--bits``): a limit in bytes is the same for both, a 32-bit
  offset counted in quantized elements (2**32 of them: 2 GiB at 4 bits, 4 GiB at 8) is not;
- every slot holds one of 61 distinct patterns (61 is prime, so a read that wraps at a power of
  two lands on another pattern), and the reference for a slot is computed from its pattern's own
  small arrays, never from the large one;
- ``gather_qmm`` on rows routed to slots spread over the whole array (both ends, the middle,
  either side of every GiB), in bf16 and fp32 activations, sorted and unsorted, in one call for
  all probes and in one call per probe (``--calls``: MLX's CUDA backend runs a gather-matvec
  kernel below 8 rows x indices and a tiled gather-matmul kernel above, as in top-10 decode);
- the same with the array built the engine's way: ``mx.zeros`` then written through a NumPy
  view (``SlotPool``), its pages moved to the GPU (``slots_to_device``) as for a full cache.

Prints one line per case and writes ``--json``; exits 1 when any case differs from its reference
by more than ``--atol`` (so the size limit in engine/model/array_limits.py can be set from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.diagnostics.large_array_check import IN_DIM, PATTERNS, ROWS, packed_cols, probe_slots, slot_bytes

GROUPS = IN_DIM // 64


def _patterns(bits: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    w = rng.integers(0, 2**32, size=(PATTERNS, ROWS, packed_cols(bits)), dtype=np.uint32)
    scales = (rng.uniform(0.9, 1.0, size=(PATTERNS, ROWS, GROUPS)) * 2.0 / (2**bits - 1) / 64).astype(np.float32)
    biases = (-(2**bits - 1) / 2 * scales).astype(np.float32)
    return w, scales, biases


def _build_plain(n_slots: int, pats: tuple[np.ndarray, np.ndarray, np.ndarray]) -> tuple[mx.array, mx.array, mx.array]:
    """The stacked arrays made from NumPy (MLX copies them into its own buffer)."""
    w, s, b = pats
    idx = np.arange(n_slots) % PATTERNS
    big_w = mx.array(w[idx])
    big_s = mx.array(s[idx]).astype(mx.bfloat16)
    big_b = mx.array(b[idx]).astype(mx.bfloat16)
    mx.eval(big_w, big_s, big_b)
    return big_w, big_s, big_b


def _build_slot_pool(n_slots: int, pats: tuple[np.ndarray, np.ndarray, np.ndarray], bits: int) -> tuple[Any, mx.array, mx.array, mx.array]:
    """The engine's way: zeros, written slot by slot through the pool's NumPy views, moved to the GPU."""
    from engine.model.expert_cache import SlotPool
    from engine.storage.expert_layout import ExpertParam

    params = [
        ExpertParam("p.weight", "U32", (ROWS, packed_cols(bits)), slot_bytes(bits)),
        ExpertParam("p.scales", "BF16", (ROWS, GROUPS), ROWS * GROUPS * 2),
        ExpertParam("p.biases", "BF16", (ROWS, GROUPS), ROWS * GROUPS * 2),
    ]
    pool = SlotPool(params, n_slots)
    w, s, b = pats
    raw = [
        w.view(np.uint8).reshape(PATTERNS, -1),
        mx_bf16_bytes(s),
        mx_bf16_bytes(b),
    ]
    for slot in range(n_slots):
        for dest, src in zip(pool.dests(slot), raw):
            assert isinstance(dest, np.ndarray)
            dest[:] = src[slot % PATTERNS]
    pool.slots_to_device(wait=True)
    return pool, pool.arrays["p.weight"], pool.arrays["p.scales"], pool.arrays["p.biases"]


def mx_bf16_bytes(a: np.ndarray) -> np.ndarray:
    """The bytes of ``a`` rounded to bf16 as MLX rounds it, one row per pattern."""
    return np.array(mx.view(mx.array(a).astype(mx.bfloat16), mx.uint8)).reshape(a.shape[0], -1)


def _case(big: tuple[mx.array, mx.array, mx.array], pats: tuple[np.ndarray, np.ndarray, np.ndarray],
          n_slots: int, dtype: mx.Dtype, sort: bool, seed: int, bits: int, single: bool) -> dict[str, Any]:  # fmt: skip
    """gather_qmm over probe slots against per-pattern quantized_matmul references.

    ``single``: one call per probed slot (one row, one index: MLX's CUDA backend takes its
    gather-matvec kernel below 8 rows x indices), else one call for all of them (its tiled
    gather-matmul kernel, as for top-10 decode and prefill).
    """
    big_w, big_s, big_b = big
    slots = probe_slots(n_slots, bits)
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal((len(slots), 1, 1, IN_DIM)).astype(np.float32)
    x = mx.array(x_np).astype(dtype)
    idx = mx.array(np.array(slots, dtype=np.uint32).reshape(-1, 1))

    def gather(xs: mx.array, ids: mx.array) -> mx.array:
        n = xs.shape[0]
        if sort:  # mlx-lm's sorted call shape: rows [N, 1, D], indices [N]
            return mx.gather_qmm(xs.reshape(n, 1, -1), big_w, big_s, big_b, rhs_indices=ids.reshape(-1),
                                 transpose=True, group_size=64, bits=bits, sorted_indices=True)  # fmt: skip
        return mx.gather_qmm(xs, big_w, big_s, big_b, rhs_indices=ids, transpose=True, group_size=64, bits=bits)

    if single:
        parts = [gather(x[i : i + 1], idx[i : i + 1]) for i in range(len(slots))]
        y = np.concatenate([np.array(p.astype(mx.float32)).reshape(1, -1) for p in parts])
    else:
        y = np.array(gather(x, idx).astype(mx.float32)).reshape(len(slots), -1)
    w, s, b = pats
    worst = 0.0
    wrong: list[int] = []
    for i, slot in enumerate(slots):
        p = slot % PATTERNS
        ref = mx.quantized_matmul(
            x[i].reshape(1, -1), mx.array(w[p]), mx.array(s[p]).astype(mx.bfloat16), mx.array(b[p]).astype(mx.bfloat16),
            transpose=True, group_size=64, bits=bits,
        )  # fmt: skip
        ref_np = np.array(ref.astype(mx.float32)).reshape(-1)
        diff = float(np.abs(ref_np - y[i]).max())
        worst = max(worst, diff)
        if diff > 1e-2 * max(1.0, float(np.abs(ref_np).max())):  # scaled by the reference, not the output under test
            wrong.append(slot)
    return {"max_abs_diff": worst, "wrong_slots": wrong, "probed": len(slots)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,2,3,4,6", help="GiB per stacked weight array")
    ap.add_argument("--paths", default="plain,slot_pool", help="how the array is built")
    ap.add_argument("--bits", default="4", help="weight bits to try, e.g. 4,8")
    ap.add_argument("--calls", default="batched,single", help="one call for all probes, one call each")
    ap.add_argument("--atol", type=float, default=5e-2)
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    args = ap.parse_args()
    mx.set_default_device(mx.gpu if args.device == "gpu" else mx.cpu)
    results: list[dict[str, Any]] = []
    failed = False
    for bits in [int(b) for b in args.bits.split(",")]:
        pats = _patterns(bits)
        for gib in [float(g) for g in args.sizes.split(",")]:
            n_slots = int(gib * (1 << 30)) // slot_bytes(bits)
            for path in args.paths.split(","):
                t0 = time.perf_counter()
                try:
                    if path == "plain":
                        big = _build_plain(n_slots, pats)
                        holder: Any = None
                    else:
                        holder, *arrays = _build_slot_pool(n_slots, pats, bits)
                        big = (arrays[0], arrays[1], arrays[2])
                except Exception as e:  # an allocation the device refuses is a result too
                    results.append({"gib": gib, "bits": bits, "path": path, "error": repr(e)})
                    print(f"{gib:g} GiB {bits}-bit {path:9s}: could not build: {e!r}", flush=True)
                    continue
                for dtype_name, dtype in (("bf16", mx.bfloat16), ("fp32", mx.float32)):
                    for call in args.calls.split(","):
                        for sort in (False, True):
                            r = _case(big, pats, n_slots, dtype, sort, seed=int(gib * 10), bits=bits,
                                      single=call == "single")  # fmt: skip
                            r.update(gib=gib, bits=bits, path=path, slots=n_slots, activations=dtype_name,
                                     sorted=sort, call=call, build_s=time.perf_counter() - t0)  # fmt: skip
                            bad = r["max_abs_diff"] > args.atol or bool(r["wrong_slots"])
                            failed |= bad
                            results.append(r)
                            print(
                                f"{gib:g} GiB {bits}-bit {path:9s} {dtype_name} {call:7s} "
                                f"{'sorted' if sort else 'plain '}: max |diff| {r['max_abs_diff']:.3g}, "
                                f"wrong slots {r['wrong_slots'] or 'none'} (of {n_slots})  {'FAIL' if bad else 'ok'}",
                                flush=True,
                            )
                del big, holder
                mx.clear_cache()
    if args.json:
        Path(args.json).write_text(json.dumps({"mlx": mx.__version__, "device": args.device, "results": results}, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
