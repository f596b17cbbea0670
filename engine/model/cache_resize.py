"""Give the in-process expert cache's memory back (and take it again) by rebuilding its pools.

The slot pools are preallocated stacked MLX arrays, so evicting entries frees nothing: a smaller
cache means new, smaller pools. ``CacheResizer`` rebuilds every bank at a budget of
``full_bytes / 2**level`` (never below the K working slots a bank needs, which ``_build_banks``
keeps), rebinds each layer's expert tensors to the new arrays, drops the old ones and clears
MLX's buffer cache so the memory really returns to the OS.

Shrinking starts the new pools cold (copying the hottest experts over would need the old and the
new pools at once, while the machine is short of memory); the experts dropped are read again
when routed to. Growing copies every resident expert into the larger pools (memory is plentiful
then), so it costs no reads.

Only at a safe point: between requests, with no generation, prefill, prefetch or warm-start read
holding or filling a slot. The caller (``Engine.resize_expert_cache``) stops the warm start;
``resize`` drains the prefetches and refuses pools with pending reads.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass

import mlx.core as mx

from engine.model.expert_cache import ExpertCache, Key, slot_param_nbytes
from engine.model.streamed_moe import ExpertStreamer, StreamedSwitch


@dataclass(frozen=True)
class ResizeOutcome:
    """What a resize did: the pools' bytes before and after, and the level it reached."""

    old_bytes: int
    new_bytes: int
    level: int  # 0: the budget's full size; n: full / 2**n
    kept_experts: int  # resident experts carried into the new pools (growing only)


class CacheResizer:
    """Halves or doubles an ExpertStreamer's pools between the budget's size and the K-slot floor."""

    def __init__(self, streamer: ExpertStreamer, switches: list[StreamedSwitch]) -> None:
        self.streamer = streamer
        self.switches = switches
        self.full_bytes = streamer.cache_bytes  # the budget chosen at load
        self.full_resident_bytes = streamer.resident_bytes
        self.level = 0

    @property
    def reduced(self) -> bool:
        """Whether the cache is below the budget's size."""
        return self.level > 0

    def shrink(self) -> ResizeOutcome | None:
        """Halve the cache; None when it is at its floor already (K working slots per bank)."""
        return self._to_level(self.level + 1)

    def grow(self) -> ResizeOutcome | None:
        """Double the cache, up to the budget's size; None when it is there already."""
        if self.level == 0:
            return None
        return self._to_level(self.level - 1)

    def _to_level(self, level: int) -> ResizeOutcome | None:
        s = self.streamer
        target = int(self.full_bytes) >> level if level < 63 else 0
        shrinking = level > self.level
        if shrinking and _resident_bytes_at(s, target) >= s.resident_bytes:
            return None  # every bank is at its working slots already: nothing to give back
        outcome = self.resize(target, keep=not shrinking)
        self.level = level
        return ResizeOutcome(outcome[0], outcome[1], level, outcome[2])

    def resize(self, cache_bytes: int, *, keep: bool) -> tuple[int, int, int]:
        """Rebuild the pools at ``cache_bytes``; with ``keep``, copy the resident experts over
        (hottest first, as many as fit). Returns (old bytes, new bytes, experts kept)."""
        s = self.streamer
        if cache_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, got {cache_bytes}")
        s.drain_prefetch()
        if any(c.pending for c in s.caches):
            raise RuntimeError("expert cache resize: a warm-start read is still filling a slot; stop the warm start first")
        s.release_pins()  # between requests every queued computation has been evaluated
        old_caches = s.caches
        old_bytes = s.resident_bytes
        hits, misses, saved = s.retired_counts
        for c in old_caches:
            hits += c.hits
            misses += c.misses
            saved += c.hits * sum(p.nbytes for p in c.pool.params)
        s.retired_counts = (hits, misses, saved)
        s._prefetched.clear()
        s._build_banks(cache_bytes, s.policy_name, s.slot_floats)
        s.cache_bytes = cache_bytes
        kept = _copy_resident(old_caches, s) if keep else 0
        for switch in self.switches:
            switch.bind_slots()
        del old_caches  # the last references to the old arrays (the switches now hold the new ones)
        gc.collect()
        mx.clear_cache()  # freed buffers go back to the OS instead of staying in MLX's cache
        return old_bytes, s.resident_bytes, kept


def _resident_bytes_at(streamer: ExpertStreamer, cache_bytes: int) -> int:
    """The pools' bytes a rebuild at ``cache_bytes`` would make, without building them."""
    floats = streamer.slot_floats
    return sum(
        slots * sum(slot_param_nbytes(p, floats) for p in layers[0].params)
        for layers, slots in streamer.bank_plan(cache_bytes, floats)
    )


def _copy_resident(old_caches: list[ExpertCache], streamer: ExpertStreamer) -> int:
    """Copy resident experts of the old pools into the new ones, hottest first where they fit."""
    wanted: dict[int, list[tuple[Key, ExpertCache]]] = {}
    for old in old_caches:
        for key in old.hot_keys():
            new = streamer.cache_of_layer[key[0]]
            wanted.setdefault(id(new), []).append((key, old))
    kept = 0
    for new in streamer.caches:
        chosen = wanted.get(id(new), [])[: new.free_slots]
        for key, old in reversed(chosen):  # coldest placed first: the policy sees the hottest last
            src = old.lookup(key)
            if src is None:
                continue
            dst = new.assign(key, set())
            for old_view, new_view in zip(old.pool._views, new.pool._views):
                new_view[dst] = old_view[src]
            kept += 1
        if chosen and new.holds_all:
            new.pool.slots_to_device(wait=True)  # (CUDA) experts that stay: into GPU memory
    return kept
