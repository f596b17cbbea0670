"""How large one stacked slot array may be on this machine's MLX backend, in bytes.

A slot pool stacks one parameter of every slot into one MLX array (``[slots, *shape]``). These
limits apply:

- Measured: on MLX 0.32.4's CUDA backend a 4 GiB slot array gave wrong logits (1.02 off mlx-lm at
  Qwen3.5-397B's shape, all 2,048 experts of 4 layers resident) while pools split into arrays of
  2 GiB and less were exact (H200, December 2026; ``bench/gpu/large_array_repro.py`` reproduces it
  against plain MLX). 2 GiB is the largest size shown exact, so every GPU backend is held to it
  until a larger size is measured exact there (``bench/gpu/large_array_repro.py`` on CUDA, the
  engine's self-check on Metal).
- The device's own maximum buffer length, where MLX reports one (Metal's ``max_buffer_length``).
- On the CPU, MLX indexes with 32-bit element counts in places: below 2**31 elements.
- Read in MLX's source (0.32.x, ``mlx/backend/cuda/device/qmm_sm80.cuh`` and ``qmm_naive.cuh``):
  CUDA's tiled gather kernel, the one top-10 decode and every prefill use, offsets the routed
  slot by ``slot x rows x cols`` in 32 bits, counted in *quantized elements*. 2**32 of them are
  2 GiB at 4 bits (the size measured exact, and where the 4 GiB fault begins), but only 1 GiB at
  2 bits and 1.5 GiB at 3. So on CUDA a packed weight's slots are also held under 2**32 quantized
  elements a stacked array. Metal's kernels offset with 64-bit strides (``quantized.h``).
"""

from __future__ import annotations

from typing import Any, Mapping

import mlx.core as mx

# The largest stacked array measured exact on a GPU backend (see the module docstring).
GPU_SAFE_ARRAY_BYTES = 2 << 30
MAX_ELEMENTS = 2**31 - 1
# CUDA's tiled gather kernel computes its offsets in 32 bits (module docstring): a stacked weight's
# slot offset in quantized elements, and a routed row's input and output offsets (layer_prefill)
CUDA_GATHER_OFFSET_LIMIT = 2**32


def backend() -> str:
    """``cuda``, ``metal`` or ``cpu``: where MLX's default device computes."""
    try:
        if mx.default_device() != mx.gpu:
            return "cpu"
    except (AttributeError, RuntimeError):
        return "cpu"
    try:
        if mx.cuda.is_available():  # type: ignore[attr-defined]
            return "cuda"
    except (AttributeError, RuntimeError):
        pass
    return "metal"


def _device_info() -> Mapping[str, Any]:
    try:
        return dict(mx.device_info())  # type: ignore[attr-defined]
    except (AttributeError, RuntimeError):
        return {}


def max_array_bytes(where: str | None = None, info: Mapping[str, Any] | None = None) -> int:
    """The byte limit for one stacked slot array on backend ``where`` (default: this one).

    ``info`` is MLX's device information (``mx.device_info()``), given by tests.
    """
    where = where or backend()
    info = _device_info() if info is None else info
    if where == "cpu":
        return 1 << 62  # bounded by MAX_ELEMENTS instead
    limit = GPU_SAFE_ARRAY_BYTES
    device_max = info.get("max_buffer_length") or info.get("max_buffer_size")
    if isinstance(device_max, int) and device_max > 0:
        limit = min(limit, device_max)
    return limit


def max_quantized_elements(where: str | None = None) -> int | None:
    """Quantized elements one stacked packed weight may hold on backend ``where``; None: no such limit."""
    return CUDA_GATHER_OFFSET_LIMIT if (where or backend()) == "cuda" else None


def max_slots_per_array(slot_bytes: int, slot_elements: int, limit_bytes: int,
                        quantized_elements: int | None = None, quantized_limit: int | None = None) -> int:  # fmt: skip
    """Slots of one parameter (``slot_bytes`` / ``slot_elements`` each) that fit one array.

    ``quantized_elements``: what one slot of a packed weight holds in its quantized type (rows x
    input columns), held under ``quantized_limit`` (``max_quantized_elements``) where there is one.
    """
    by_bytes = limit_bytes // max(1, slot_bytes)
    by_elements = MAX_ELEMENTS // max(1, slot_elements)
    slots = min(by_bytes, by_elements)
    if quantized_elements and quantized_limit:
        slots = min(slots, quantized_limit // quantized_elements)
    return max(1, slots)


def recommended_working_set_bytes(where: str | None = None, info: Mapping[str, Any] | None = None) -> int | None:
    """Metal's recommended working set (``max_recommended_working_set_size``), else None.

    Past it macOS pages the GPU's memory, so the automatic expert cache stays under it. CUDA and
    the CPU report none (their limit is the device's memory or the RAM, counted elsewhere).
    """
    where = where or backend()
    if where != "metal":
        return None
    info = _device_info() if info is None else info
    size = info.get("max_recommended_working_set_size")
    return size if isinstance(size, int) and size > 0 else None
