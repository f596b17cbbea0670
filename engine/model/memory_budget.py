"""The memory budget: how large the expert cache may be on this machine, and MLX's limits.

The engine's footprint is the runtime it starts from (interpreter, MLX, tokenizer), the dense
weights, the KV cache of the context in use, the working slots (K experts per layer group), the
prefill's transient memory and a margin for allocator slack and activations. What is left of the
RAM goes partly to the in-process expert cache and mostly to the OS page cache, which is the
second-level expert cache (on a Mac a large in-process cache made the memory compressor thrash).
With a memory limit the whole footprint is capped: the cache is what the limit leaves, and a
model whose fixed part alone exceeds the limit is refused with the numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from engine.errors import ModelError

if TYPE_CHECKING:
    import mlx.nn as nn

    from engine.storage.expert_layout import LayerExperts

MIB = 2**20
GIB = 2**30

# Share of the spare RAM (after the footprint's fixed part and the OS's own reserve) given to the
# in-process cache; the rest is the page-cache reserve. Chosen from BENCHMARKS.md, "Page-cache
# reserve: the in-process share, measured under a memory cgroup": the page cache only ever holds
# what the in-process cache missed, so a reserve smaller than the in-process cache duplicates it and
# serves almost nothing (0.29 MiB/token at 75% against 26 at 0%), while every in-process hit saves
# a copy. The projected Mac expert time per token fell from 15% to 75% (by 9% measured, 22% on the
# calibrated two-level simulation); 100% projected lowest, but leaves no page cache for the OS to
# drop under pressure (anonymous memory is compressed or swapped instead) and would put the 397B's
# MLX buffers above Metal's recommended working set on a 48 GB Mac, neither of which the
# projection counts; 75% keeps a quarter as that reserve. On Metal the cache is also held under the
# GPU's recommended working set (plan_budget's gpu_working_set_bytes). Both the sweep and the
# simulation ran the in-process cache as LRU (per layer); the default policy now hits 1-3 points more
# at 5-40% (BENCHMARKS.md, 'Expert cache policy'), which only favours the in-process side further.
CACHE_SHARE_OF_SPARE = 0.75
# RAM the OS and other apps keep when no limit is given (the budget never plans to use it).
OS_RESERVE_BYTES = 2 * GIB
# Allocator slack, I/O buffers, activations and the sampler beyond what is estimated below.
MARGIN_BYTES = 160 * MIB
# Experts the CPU prefill dequantizes between two evaluations (engine.model.prefill_matmul).
PREFILL_EXPERTS_PER_EVAL = 8
# MLX's buffer cache (freed buffers kept for reuse) is held to this: freed buffers would
# otherwise compete with the page cache for RAM.
MLX_CACHE_LIMIT_BYTES = 256 * MIB


class MemoryLimitError(ModelError):
    """The model's fixed part does not fit under --memory-limit-mb."""

    code = "memory_limit"


@dataclass(frozen=True)
class MemoryNeeds:
    """What a load needs besides the expert cache, in bytes."""

    runtime_bytes: int  # the process before loading (interpreter, MLX, tokenizer)
    dense_bytes: int  # resident weights as they will be held (fp32 on the CPU)
    kv_bytes: int  # KV (and linear-attention state) for the context in use
    working_bytes: int  # the slots every layer group needs for one step (K per group)
    prefill_bytes: int  # transient dequantized experts and chunk activations
    margin_bytes: int = MARGIN_BYTES

    @property
    def fixed_bytes(self) -> int:
        """Everything but the cache."""
        return (self.runtime_bytes + self.dense_bytes + self.kv_bytes + self.working_bytes
                + self.prefill_bytes + self.margin_bytes)  # fmt: skip


@dataclass(frozen=True)
class MemoryBudget:
    """The expert cache chosen for a load, why, and the limits handed to MLX."""

    cache_bytes: int  # in-process expert cache, beyond the working slots
    reason: str  # one line: why this size
    mode: str  # "auto", "user" or "limit"
    limit_bytes: int | None  # the whole footprint's cap (--memory-limit-mb), or None
    ram_total_bytes: int
    ram_available_bytes: int
    page_cache_reserve_bytes: int  # RAM deliberately left to the OS page cache
    needs: MemoryNeeds
    mlx_memory_limit_bytes: int  # for mx.set_memory_limit: MLX's buffers under the footprint
    mlx_cache_limit_bytes: int  # for mx.set_cache_limit

    @property
    def footprint_bytes(self) -> int:
        """The footprint the budget plans for: fixed part plus cache."""
        return self.needs.fixed_bytes + self.cache_bytes

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready figures."""
        d = asdict(self)
        d["footprint_bytes"] = self.footprint_bytes
        d["fixed_bytes"] = self.needs.fixed_bytes
        return d


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _mib(n: float) -> str:
    return f"{n / MIB:.0f} MiB"


def kv_cache_bytes(config: dict[str, Any], context_tokens: int, dtype_bytes: int) -> int:
    """Bytes of the KV cache (and linear-attention state) for ``context_tokens`` of context.

    Full-attention layers hold 2 x kv_heads x head_dim per token; hybrid models (Qwen3-Next,
    Qwen3.5) have full attention every ``full_attention_interval`` layers and a fixed-size
    recurrent state in the others.
    """
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(c, dict)
    layers = int(c.get("num_hidden_layers", 0) or 0)
    heads = int(c.get("num_attention_heads", 1) or 1)
    kv_heads = int(c.get("num_key_value_heads", heads) or heads)
    head_dim = int(c.get("head_dim") or (int(c.get("hidden_size", 0)) // heads))
    interval = int(c.get("full_attention_interval", 1) or 1)
    full_layers = layers // interval if interval > 1 else layers
    kv = full_layers * 2 * kv_heads * head_dim * context_tokens * dtype_bytes
    linear_layers = layers - full_layers
    if linear_layers and c.get("linear_num_value_heads"):
        state = (int(c["linear_num_value_heads"]) * int(c.get("linear_key_head_dim", 0))
                 * int(c.get("linear_value_head_dim", 0)))  # fmt: skip
        conv = int(c.get("linear_conv_kernel_dim", 4)) * (
            2 * int(c.get("linear_num_key_heads", 0)) * int(c.get("linear_key_head_dim", 0))
            + int(c["linear_num_value_heads"]) * int(c.get("linear_value_head_dim", 0))
        )
        kv += linear_layers * (state * 4 + conv * dtype_bytes)
    return int(kv)


def prefill_working_bytes(
    expert_bytes: int, bits: int, hidden: int, chunk_tokens: int, k: int, dequantize_on_cpu: bool
) -> int:
    """Transient prefill memory: dequantized experts (CPU GEMM path) and a chunk's activations."""
    activations = chunk_tokens * hidden * 4 * (2 * k + 8)
    if not dequantize_on_cpu:
        return activations
    widen = 32 // max(1, bits)  # an expert's quantized bytes as fp32
    return PREFILL_EXPERTS_PER_EVAL * expert_bytes * widen + activations


def plan_budget(
    *,
    needs: MemoryNeeds,
    expert_bytes_total: int,
    ram_total: int,
    ram_available: int,
    cache_mb: float | None,
    memory_limit_mb: float | None,
    gpu_working_set_bytes: int | None = None,
) -> MemoryBudget:
    """Choose the expert cache: the user's size, or ``auto`` from this machine and the limit.

    ``auto``: CACHE_SHARE_OF_SPARE of the RAM left after the fixed part and OS_RESERVE_BYTES (of
    the available RAM, counted as if this process had not started), never more than every
    expert, and on Metal never so much that MLX's buffers pass the GPU's recommended working set
    (``gpu_working_set_bytes``: past it macOS pages GPU memory); the rest is the page-cache
    reserve. With ``memory_limit_mb`` the footprint (fixed part + cache) stays under the limit; a
    fixed part above it raises MemoryLimitError.
    """
    limit = int(memory_limit_mb * MIB) if memory_limit_mb is not None else None
    if limit is not None and limit <= 0:
        raise ModelError(f"--memory-limit-mb must be positive, got {memory_limit_mb}")
    if cache_mb is not None and cache_mb < 0:
        raise ModelError(f"--cache-mb must be 'auto' or >= 0, got {cache_mb}")
    fixed = needs.fixed_bytes
    if limit is not None and fixed > limit:
        raise MemoryLimitError(
            f"--memory-limit-mb {memory_limit_mb:g}: the model needs {_mib(fixed)} before any expert cache "
            f"(runtime {_mib(needs.runtime_bytes)} + dense weights {_mib(needs.dense_bytes)} + KV cache "
            f"{_mib(needs.kv_bytes)} + working expert slots {_mib(needs.working_bytes)} + prefill "
            f"{_mib(needs.prefill_bytes)} + margin {_mib(needs.margin_bytes)}), more than the limit of "
            f"{_mib(limit)}; raise the limit, shorten the context, or choose a smaller model"
        )
    # the process's own runtime is already counted out of "available"
    usable = max(0, min(ram_total, ram_available + needs.runtime_bytes) - OS_RESERVE_BYTES)
    spare = max(0, usable - fixed)
    auto = int(min(expert_bytes_total, CACHE_SHARE_OF_SPARE * spare))
    mlx_fixed = needs.dense_bytes + needs.kv_bytes + needs.working_bytes + needs.prefill_bytes + needs.margin_bytes
    gpu_cap = None if gpu_working_set_bytes is None else max(0, gpu_working_set_bytes - mlx_fixed)
    capped_by_gpu = gpu_cap is not None and gpu_cap < auto
    if capped_by_gpu:
        auto = gpu_cap  # type: ignore[assignment]
    if cache_mb is not None:
        cache = int(cache_mb * MIB)
        mode, reason = "user", f"set by the user ({_mib(cache)})"
        if limit is not None and fixed + cache > limit:
            cache = limit - fixed
            mode, reason = "limit", (f"the user's {_mib(cache_mb * MIB)} cut to {_mib(cache)} to stay under the "
                                     f"memory limit of {_mib(limit)} (the rest needs {_mib(fixed)})")  # fmt: skip
    elif limit is not None and fixed + auto > limit:
        cache = limit - fixed
        mode, reason = "limit", (f"what the memory limit of {_mib(limit)} leaves after {_mib(fixed)} for the "
                                 f"runtime, dense weights, KV cache, working slots and prefill")  # fmt: skip
    else:
        cache = auto
        mode = "auto"
        if capped_by_gpu:
            reason = (f"what the GPU's recommended working set of {_gib(gpu_working_set_bytes or 0)} leaves after "
                      f"{_gib(mlx_fixed)} of MLX buffers for the dense weights, KV cache, slots and prefill "
                      f"({int(100 * CACHE_SHARE_OF_SPARE)}% of the {_gib(spare)} spare RAM would pass it); "
                      "the rest is left to the OS page cache")  # fmt: skip
        elif auto >= expert_bytes_total:
            reason = f"every expert ({_gib(expert_bytes_total)}) fits in {int(100 * CACHE_SHARE_OF_SPARE)}% of the spare RAM"
        else:
            reason = (f"{int(100 * CACHE_SHARE_OF_SPARE)}% of the {_gib(spare)} spare RAM (of {_gib(ram_available)} "
                      f"available, after {_gib(fixed)} for the engine and {_gib(OS_RESERVE_BYTES)} for the OS); "
                      "the rest is left to the OS page cache")  # fmt: skip
    cache = max(0, min(cache, expert_bytes_total))
    reserve = max(0, spare - cache) if limit is None else max(0, usable - min(limit, usable))
    mlx_limit = mlx_fixed + cache
    return MemoryBudget(
        cache_bytes=cache,
        reason=reason,
        mode=mode,
        limit_bytes=limit,
        ram_total_bytes=ram_total,
        ram_available_bytes=ram_available,
        page_cache_reserve_bytes=reserve,
        needs=needs,
        mlx_memory_limit_bytes=mlx_limit,
        mlx_cache_limit_bytes=MLX_CACHE_LIMIT_BYTES,
    )


def slot_bytes_per_expert(layer: "LayerExperts", slot_floats: str) -> int:
    """Bytes one expert takes in a slot pool (float parameters as ``slot_floats`` holds them,
    see expert_cache.slot_dtype: 16-bit scales widened to fp32, or fp32 ones narrowed to bf16)."""
    from engine.model.expert_cache import slot_param_nbytes

    return sum(slot_param_nbytes(p, slot_floats) for p in layer.params)


def resident_dense_bytes(model: "nn.Module", expert_paths: list[str], widen_to_fp32: bool) -> int:
    """Bytes of the parameters that stay resident (all but the experts), as they will be held.

    Works on a lazily built model (shapes and dtypes only, nothing read). On the CPU the engine
    casts floating weights to fp32, so 16-bit floats count twice.
    """
    import mlx.core as mx
    from mlx.utils import tree_flatten

    prefixes = tuple(p + "." for p in expert_paths)
    total = 0
    params: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    for key, arr in params:
        if key.startswith(prefixes):
            continue
        size = arr.nbytes
        if widen_to_fp32 and arr.dtype in (mx.bfloat16, mx.float16):
            size *= 2
        total += size
    return int(total)


def memory_needs(
    *,
    model: "nn.Module",
    config: dict[str, Any],
    expert_paths: list[str],
    layers: list["LayerExperts"],
    k: int,
    device: str,
    context_tokens: int,
    prefill_chunk: int,
    prefetch: bool,
    cpu_prefill_gemm: bool,
    runtime_bytes: int,
    slot_floats: str,
    dense_fp32: bool | None = None,
) -> MemoryNeeds:
    """Estimate what a load needs besides the expert cache, from the lazily built model.

    ``dense_fp32``: whether the dense weights will be cast to fp32 (default: on the CPU).
    ``slot_floats``: how slots hold scales (expert_cache.slot_dtype).
    """
    on_cpu = device == "cpu"
    widen = on_cpu if dense_fp32 is None else dense_fp32
    dense = resident_dense_bytes(model, expert_paths, widen_to_fp32=widen)
    c = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    assert isinstance(c, dict)
    act_bytes = 4 if widen else 2
    kv = kv_cache_bytes(config, context_tokens, act_bytes)
    groups: dict[Any, LayerExperts] = {}
    for layer in layers:
        groups.setdefault(layer.signature, layer)
    working_slots = k * (2 if prefetch else 1)
    working = sum(working_slots * slot_bytes_per_expert(l, slot_floats) for l in groups.values())
    bits = int((c.get("quantization") or config.get("quantization") or {}).get("bits", 16))
    largest = max(layers, key=lambda l: l.expert_bytes)
    prefill = prefill_working_bytes(
        largest.expert_bytes, bits, int(c.get("hidden_size", 0) or 0), prefill_chunk, k, on_cpu and cpu_prefill_gemm
    )
    return MemoryNeeds(runtime_bytes, dense, kv, working, prefill)


def every_expert_cache_mb(expert_bytes_total: int) -> float:
    """A cache size (MiB) that holds every expert, whatever dtype the slots hold scales in.

    Slots may widen 16-bit scales to fp32 (fp32 activations), so an expert can take more than
    its stored bytes, never twice as many; the pools never take more slots than there are
    experts, so the rest of the budget is not allocated. (Sized at the stored bytes plus a
    margin, the H100's 397B-shape bench got pools of 925 of 1,024 experts per layer pair and
    never routed on the device.)
    """
    return 2 * expert_bytes_total / 2**20 + 64
