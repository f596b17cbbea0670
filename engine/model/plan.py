"""The memory plan: what stays resident, what streams, and the speed this disk allows."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from engine.model.memory_budget import MemoryBudget

GIB = 2**30


@dataclass
class MemoryPlan:
    """Figures a user needs before loading: bytes resident and streamed, and the tok/s bound."""

    model_type: str
    moe_layers: int
    experts_per_layer: int
    experts_per_token: int
    trained_experts_per_token: int
    dense_bytes: int  # resident: attention, norms, routers, shared experts, embeddings
    expert_bytes_total: int  # streamed from disk
    expert_bytes: int  # one expert
    expert_bytes_per_token: int  # layers x K x one expert, all read when nothing is cached
    cache_budget_bytes: int  # the in-process expert cache chosen for this load (the one figure shown)
    cache_reason: str  # why that size (automatic, the user's, or what the memory limit leaves)
    cache_mode: str  # "auto", "user" or "limit"
    memory_limit_bytes: int | None  # the footprint cap asked for, or None
    footprint_bytes: int  # what the budget plans for: runtime, dense, KV, slots, prefill, margin, cache
    page_cache_reserve_bytes: int  # RAM left to the OS page cache (the second-level expert cache)
    ram_total_bytes: int
    ram_available_bytes: int
    disk_read_bytes_per_s: float | None  # measured cold parallel reads of expert-sized blocks
    tps_bound_cold: float | None  # disk / bytes per token: the ceiling with every expert read
    layout: str  # "packed" or "safetensors"
    budget: dict[str, Any] = field(default_factory=dict)  # the budget's parts (MemoryBudget.to_dict)

    @property
    def fits_in_ram(self) -> bool:
        """Whether the whole model would fit in available RAM (streaming is then optional)."""
        return self.dense_bytes + self.expert_bytes_total < self.ram_available_bytes

    def to_dict(self) -> dict[str, Any]:
        """Return the plan as a JSON-ready dict."""
        d = asdict(self)
        d["fits_in_ram"] = self.fits_in_ram
        return d

    def describe(self) -> str:
        """A short human-readable summary, one figure per line."""
        def gb(n: float) -> str:
            return f"{n / GIB:.2f} GiB"

        limit = f", limit {gb(self.memory_limit_bytes)}" if self.memory_limit_bytes else ""
        lines = [
            f"model: {self.model_type}, {self.moe_layers} MoE layers x {self.experts_per_layer} experts, "
            f"K={self.experts_per_token} (trained {self.trained_experts_per_token})",
            f"resident (dense weights): {gb(self.dense_bytes)}",
            f"streamed (experts): {gb(self.expert_bytes_total)} ({self.expert_bytes / 2**20:.2f} MiB each, "
            f"{self.layout} layout)",
            f"expert bytes per token at K={self.experts_per_token}: {self.expert_bytes_per_token / 2**20:.1f} MiB",
            f"RAM: {gb(self.ram_available_bytes)} available of {gb(self.ram_total_bytes)}",
            f"expert cache: {gb(self.cache_budget_bytes)} ({self.cache_mode}: {self.cache_reason})",
            f"engine footprint: {gb(self.footprint_bytes)}{limit}; left to the OS page cache: "
            f"{gb(self.page_cache_reserve_bytes)}",
        ]
        if self.disk_read_bytes_per_s:
            lines.append(f"disk cold read: {self.disk_read_bytes_per_s / 1e9:.2f} GB/s")
            lines.append(f"tok/s bound with no expert cached: {self.tps_bound_cold:.2f}")
        return "\n".join(lines)


def make_plan(
    *,
    model_type: str,
    moe_layers: int,
    experts_per_layer: int,
    k: int,
    trained_k: int,
    dense_bytes: int,
    expert_bytes_total: int,
    expert_bytes: int,
    budget: MemoryBudget,
    disk_read_bytes_per_s: float | None,
    layout: str,
) -> MemoryPlan:
    """Build the plan from the model's layout, the memory budget and a disk measurement."""
    per_token = moe_layers * k * expert_bytes
    bound = disk_read_bytes_per_s / per_token if disk_read_bytes_per_s and per_token else None
    return MemoryPlan(
        model_type=model_type,
        moe_layers=moe_layers,
        experts_per_layer=experts_per_layer,
        experts_per_token=k,
        trained_experts_per_token=trained_k,
        dense_bytes=dense_bytes,
        expert_bytes_total=expert_bytes_total,
        expert_bytes=expert_bytes,
        expert_bytes_per_token=per_token,
        cache_budget_bytes=budget.cache_bytes,
        cache_reason=budget.reason,
        cache_mode=budget.mode,
        memory_limit_bytes=budget.limit_bytes,
        footprint_bytes=budget.footprint_bytes,
        page_cache_reserve_bytes=budget.page_cache_reserve_bytes,
        ram_total_bytes=budget.ram_total_bytes,
        ram_available_bytes=budget.ram_available_bytes,
        disk_read_bytes_per_s=disk_read_bytes_per_s,
        tps_bound_cold=bound,
        layout=layout,
        budget=budget.to_dict(),
    )
