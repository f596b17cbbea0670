"""MLX's allocator under the memory budget: its limits, its buffer cache, and its figures.

MLX keeps freed buffers in a cache of its own for reuse; on a Mac those buffers compete with
the OS page cache, which holds the experts the in-process cache does not. The budget sets MLX's
memory limit (the footprint of its buffers) and holds its buffer cache small.

The wired limit (``mx.set_wired_limit``, macOS only) is not set: it keeps buffers resident at the
cost of the page cache, and no measurement here supports it (the project has no Mac; on Linux
and CUDA MLX ignores it and returns 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from engine.model.memory_budget import MemoryBudget


@dataclass(frozen=True)
class MlxMemory:
    """MLX's allocator figures, in bytes."""

    active_bytes: int  # buffers in use
    cached_bytes: int  # freed buffers MLX keeps for reuse
    peak_bytes: int  # most active bytes since the process started (or the last reset)


def mlx_memory() -> MlxMemory:
    """MLX's active, cached and peak memory now."""
    return MlxMemory(int(mx.get_active_memory()), int(mx.get_cache_memory()), int(mx.get_peak_memory()))


def apply_mlx_limits(budget: "MemoryBudget") -> tuple[int, int]:
    """Set MLX's memory limit and buffer-cache limit from the budget; return the previous ones.

    The memory limit is raised to the budget's figure only when a footprint cap was asked for or
    when it is above MLX's default (so a smaller model never lowers what MLX allowed before).
    """
    limit = budget.mlx_memory_limit_bytes
    if budget.limit_bytes is None:
        limit = max(limit, int(mx.get_memory_limit()))
    old_limit = int(mx.set_memory_limit(limit))
    old_cache = int(mx.set_cache_limit(budget.mlx_cache_limit_bytes))
    return old_limit, old_cache


def clear_mlx_cache() -> None:
    """Return MLX's cached (freed) buffers to the OS."""
    mx.clear_cache()
