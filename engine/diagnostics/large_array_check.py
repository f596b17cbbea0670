"""Does the quantized expert matmul read the right slot from a stacked array as large as the engine makes?

The engine stacks one parameter of every cached expert into one MLX array (a slot pool) and routes
rows to slots with ``gather_qmm``. On MLX 0.32.4's CUDA backend a 4 GiB array of 4-bit experts gave
wrong logits; arrays of 2 GiB were exact, and ``engine/model/array_limits.py`` holds every GPU
backend to the largest size shown exact. This check builds one stacked array at that size on the
default device (Metal on a Mac: where only a Mac can tell) and compares ``gather_qmm`` on slots
across the whole array, in one call for all of them and one call each (MLX may pick different
kernels for the two), against ``quantized_matmul`` on each slot's own small array.

It checks 4-bit slots, the usual experts, at the byte limit. On CUDA the engine also keeps a packed
weight under 2**32 quantized elements (1 GiB at 2 bits, 1.5 GiB at 3); those sizes follow from
MLX's source and are tested by ``bench/gpu/large_array_repro.py``, not here.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx

ROWS, IN_DIM, GROUP = 1024, 4096, 64  # one Qwen3.5-397B expert projection
PATTERNS = 61  # prime: a read that wraps at a power of two lands on another pattern
CPU_CHECK_BYTES = 256 << 20  # the CPU has no byte limit (array_limits); a modest size shows the path


@dataclass
class LargeArrayResult:
    """What the check found: the size built, the slots probed and the ones that read wrong."""

    array_bytes: int
    slots: int
    probed: int
    wrong: list[int]
    max_abs_diff: float


def packed_cols(bits: int) -> int:
    """uint32 words per weight row at ``bits`` bits."""
    return IN_DIM * bits // 32


def slot_bytes(bits: int) -> int:
    """Bytes of one slot's packed weight at ``bits`` bits."""
    return ROWS * IN_DIM * bits // 8


def probe_slots(n_slots: int, bits: int) -> list[int]:
    """Sixteen slots spread evenly, both ends, and either side of every GiB of the array.

    At least 10 probes where the array has them: a top-10 decode's count of rows x indices, which is
    what makes MLX's CUDA backend choose its tiled gather kernel over the matvec one (below 8).
    """
    picks = {0, 1, n_slots // 2, n_slots - 2, n_slots - 1}
    picks.update(range(0, n_slots, max(1, n_slots // 16)))
    per_gib = max(1, (1 << 30) // slot_bytes(bits))
    for b in range(per_gib, n_slots, per_gib):
        picks.update({b - 1, b, min(n_slots - 1, b + 1)})
    return sorted(p for p in picks if 0 <= p < n_slots)


def check_stacked_array(array_bytes: int, bits: int = 4, dtype: mx.Dtype = mx.bfloat16, seed: int = 0) -> LargeArrayResult:
    """Build an ``array_bytes`` stack of ``bits``-bit slots on the default device and probe it."""
    n_slots = max(2, array_bytes // slot_bytes(bits))
    key = mx.random.key(seed)
    k_w, k_s, k_x = mx.random.split(key, 3)
    words = packed_cols(bits)
    k_hi, k_lo = mx.random.split(k_w, 2)
    halves = [mx.random.randint(0, 1 << 16, (PATTERNS, ROWS, words), key=k).astype(mx.uint32) for k in (k_hi, k_lo)]
    pat_w = (halves[0] << 16) | halves[1]  # every bit drawn
    step = 2.0 / (2**bits - 1) / GROUP
    pat_s = (mx.random.uniform(0.9, 1.0, (PATTERNS, ROWS, IN_DIM // GROUP), key=k_s) * step).astype(dtype)
    pat_b = (pat_s.astype(mx.float32) * (-(2**bits - 1) / 2)).astype(dtype)
    which = mx.arange(n_slots, dtype=mx.uint32) % PATTERNS
    big_w, big_s, big_b = (mx.take(p, which, axis=0) for p in (pat_w, pat_s, pat_b))
    mx.eval(big_w, big_s, big_b)
    slots = probe_slots(n_slots, bits)
    x = mx.random.normal((len(slots), 1, 1, IN_DIM), key=k_x).astype(dtype)
    idx = mx.array(slots, dtype=mx.uint32).reshape(-1, 1)

    def gather(xs: mx.array, ids: mx.array) -> mx.array:
        return mx.gather_qmm(xs, big_w, big_s, big_b, rhs_indices=ids, transpose=True, group_size=GROUP, bits=bits)

    batched = gather(x, idx).reshape(len(slots), -1)
    single = mx.concatenate([gather(x[i : i + 1], idx[i : i + 1]).reshape(1, -1) for i in range(len(slots))])
    wrong: list[int] = []
    worst = 0.0
    for i, slot in enumerate(slots):
        p = slot % PATTERNS
        ref = mx.quantized_matmul(x[i].reshape(1, -1), pat_w[p], pat_s[p], pat_b[p], transpose=True,
                                  group_size=GROUP, bits=bits).reshape(-1).astype(mx.float32)  # fmt: skip
        scale = max(1.0, float(mx.max(mx.abs(ref))))
        diff = max(float(mx.max(mx.abs(out[i].astype(mx.float32) - ref))) for out in (batched, single))
        worst = max(worst, diff)
        if diff > 1e-2 * scale:
            wrong.append(slot)
    del big_w, big_s, big_b
    mx.clear_cache()
    return LargeArrayResult(n_slots * slot_bytes(bits), n_slots, len(slots), wrong, worst)


def array_bytes_to_check(backend: str, limit: int, available_ram: int | None) -> tuple[int, str]:
    """The size to build: the backend's limit (the CPU: a modest size), capped at a quarter of free RAM."""
    if backend == "cpu":
        return CPU_CHECK_BYTES, "the CPU has no byte limit; checked at 256 MiB"
    size = limit
    if available_ram and size > available_ram // 4:
        size = max(CPU_CHECK_BYTES, available_ram // 4)
        return size, f"the {backend} limit is {limit / 2**30:.1f} GiB; checked at {size / 2**30:.2f} GiB (a quarter of free RAM)"
    return size, f"the {backend} limit for one stacked array"
