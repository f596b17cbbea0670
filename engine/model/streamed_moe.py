"""The streamed MoE layer: routes, makes the chosen experts resident, runs mlx-lm's own kernels.

``StreamedSwitch`` replaces an mlx-lm ``SwitchGLU``/``SwitchMLP``. The original module is kept,
but its stacked ``[E, ...]`` expert tensors are swapped for slot arrays ``[S, ...]``; expert ids
are remapped to slot ids and the original ``__call__`` runs unchanged, so the arithmetic is
mlx-lm's. Each call synchronises once (the router's indices are needed on the host to know what
to read), reads the missing experts in parallel, and queues the compute lazily. A layer whose
every expert is resident in a pool that holds all of its layers (nothing can be evicted) routes
on the device instead: expert ids go through a device-side table of slots, with no host sync.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from engine.errors import UnsupportedModelError
from engine.model.array_limits import max_array_bytes, max_quantized_elements, max_slots_per_array
from engine.model.kernel_shapes import pad_to
from engine.model.prefill_matmul import PrefillMatmul
from engine.model.expert_cache import ExpertCache, Key, SlotPool, slot_param_nbytes
from engine.model.expert_parallel import ExpertParallel
from engine.model.cache_policies import DEFAULT_POLICY
from engine.diagnostics.traces import TraceRecorder
from engine.storage.expert_layout import LayerExperts
from engine.storage.expert_store import ExpertStore
from engine.types import StepFigures


# gather_slots copies a call's experts only where they are at most this many times K (a decode
# step's K, a cold prefill's small groups): a long call on a large pool is not doubled in memory
GATHER_MAX_EXPERTS_PER_K = 2


@dataclass
class _Binding:
    """What a StreamedSwitch needs but must not register as MLX parameters (not a Module)."""

    inner: nn.Module
    streamer: "ExpertStreamer"
    param_keys: list[str]
    next_router: Callable[[mx.array], mx.array] | None = None
    extra: tuple[tuple[Any, ...], dict[str, Any]] = ((), {})  # the current call's other arguments


@dataclass
class _PendingReads:
    """Experts given slots by ``ExpertStreamer.begin`` whose reads may still be running."""

    cache: ExpertCache
    keys: list[Key]
    slots: np.ndarray
    waits: list[tuple[Key, "Future[int]"]]
    filled: list[int]


class ExpertStreamer:
    """Owns the slot pools, the expert cache and the store; counts what each step cost."""

    def __init__(
        self,
        layers: list[LayerExperts],
        store: ExpertStore,
        *,
        cache_bytes: int,
        experts_per_token: int,
        prefetch: bool = False,
        policy: str = DEFAULT_POLICY,
        slot_floats: str = "",
    ) -> None:
        self.layers = layers
        self.store = store
        self.k = experts_per_token
        self.prefetch = prefetch
        self.device_routing = True  # route fully resident layers on the device (no host sync)
        self.device_routed_calls = 0  # layer calls that did so, since load
        self.host_syncs = 0  # layer calls that waited for the router on the host, since load
        self._luts: dict[int, tuple[int, mx.array]] = {}  # layer -> (cache version, slot table)
        self.figures = StepFigures()
        self.trace: TraceRecorder | None = None  # records each layer call's routing (host path only)
        self.parallel: ExpertParallel | None = None  # this rank's share of the experts (several machines)
        self.in_prefill = False  # set by generate while the prompt runs (marks trace lines)
        self.prefetched_hits = 0
        self.skip_layer: int | None = None  # a layer whose output will not be used (see generate)
        self.last_layer_is_final_block = False  # set by the loader
        # the backend whose kernel choice split expert calls must follow (engine.model.kernel_shapes);
        # "cpu": none to follow (rows are independent there, or mlx-lm's shapes are off)
        self.kernel_backend = "cpu"
        self.prefill_matmul = PrefillMatmul()  # long prefill calls off mlx-lm's kernels (see prefill_matmul)
        # copy a streaming layer's call's experts into a compact array first (StreamedSwitch._gathered)
        self.gather_slots = False
        # Called between the expert groups of a layer; raises to stop (generate sets it during a
        # prefill whose cache it can roll back; see prefill_progress).
        self.abort_check: Callable[[], None] | None = None
        self.touched: set[Key] | None = None  # when a set: every (layer, expert) routed to (bench)
        self._pinned: set[Key] = set()
        self._inflight: dict[Key, tuple[ExpertCache, "Future[int]"]] = {}
        self._prefetched: set[Key] = set()  # resident because of a prediction, not yet used
        self.caches: list[ExpertCache] = []  # one per bank
        self.cache_of_layer: list[ExpertCache] = [None] * len(layers)  # type: ignore[list-item]
        self.max_array_bytes = max_array_bytes()  # one stacked slot array at most (array_limits)
        self.max_quantized_elements = max_quantized_elements()  # and in quantized elements (CUDA)
        self.cache_bytes = cache_bytes  # the budget the pools are built for now (cache_resize changes it)
        self.policy_name = policy
        self.slot_floats = slot_floats  # how slots hold float parameters (expert_cache.slot_dtype)
        # hits, misses and saved bytes of pools dropped by a resize (the counters are since load)
        self.retired_counts = (0, 0, 0)
        self._build_banks(cache_bytes, policy, slot_floats)

    def _build_banks(self, cache_bytes: int, policy: str, slot_floats: str) -> None:
        """Split layers into banks of equal expert shapes; size each bank's pool from the budget."""
        self.caches = []
        self.cache_of_layer = [None] * len(self.layers)  # type: ignore[list-item]
        self._luts.clear()
        for bank_layers, slots in self.bank_plan(cache_bytes, slot_floats):
            sizes = {l.layer: l.num_experts for l in bank_layers}
            cache = ExpertCache(SlotPool(bank_layers[0].params, slots, slot_floats=slot_floats), policy, layer_experts=sizes)
            if not cache.holds_all:
                cache.pool.prefer_host()  # slots refilled all the time: read in place (CUDA)
            self.caches.append(cache)
            for layer in bank_layers:
                self.cache_of_layer[layer.layer] = cache

    def bank_plan(self, cache_bytes: int, slot_floats: str) -> list[tuple[list[LayerExperts], int]]:
        """The banks a budget of ``cache_bytes`` makes: (its layers, its slots) each; allocates nothing."""
        groups: dict[tuple, list[LayerExperts]] = {}
        for layer in self.layers:
            groups.setdefault(layer.signature, []).append(layer)
        total_bytes = sum(l.expert_bytes * l.num_experts for l in self.layers)
        working = self.k * (2 if self.prefetch else 1)
        plan: list[tuple[list[LayerExperts], int]] = []
        for members in groups.values():
            per_expert = members[0].expert_bytes
            group_total = per_expert * members[0].num_experts * len(members)
            share = cache_bytes * group_total / total_bytes if total_bytes else 0
            budget_slots = min(int(share // per_expert), members[0].num_experts * len(members))
            # each stacked array under the backend's safe size (see array_limits)
            max_per_bank = max(working, min(
                max_slots_per_array(slot_param_nbytes(p, slot_floats),
                                    math.prod(p.shape), self.max_array_bytes,
                                    members[0].quantized_elements.get(p.key), self.max_quantized_elements)
                for p in members[0].params
            ))  # fmt: skip
            n_banks = max(1, min(len(members), math.ceil(budget_slots / max_per_bank)))
            for b in range(n_banks):
                bank_layers = members[b::n_banks]
                slots = max(working, min(max_per_bank, budget_slots * len(bank_layers) // len(members)))
                plan.append((bank_layers, slots))
        return plan

    @property
    def resident_bytes(self) -> int:
        """Bytes held by all slot pools."""
        return sum(c.pool.nbytes for c in self.caches)

    @property
    def hits(self) -> int:
        """Expert lookups served without a read, since load."""
        return self.retired_counts[0] + sum(c.hits for c in self.caches)

    @property
    def misses(self) -> int:
        """Expert lookups that needed a read, since load."""
        return self.retired_counts[1] + sum(c.misses for c in self.caches)

    @property
    def saved_bytes(self) -> int:
        """Expert bytes the cache's hits did not have to read, since load."""
        return self.retired_counts[2] + sum(c.hits * sum(p.nbytes for p in c.pool.params) for c in self.caches)

    def take_figures(self) -> StepFigures:
        """Return the figures accumulated since the last call and start afresh."""
        f, self.figures = self.figures, StepFigures()
        return f

    def release_pins(self) -> None:
        """Everything queued so far has been evaluated: no slot is in use by pending compute."""
        self._pinned.clear()

    def unpin(self, keys: list[Key]) -> None:
        """The computation that read these experts has been evaluated: their slots may be reused."""
        self._pinned.difference_update(keys)

    def place_for_rows(self, layer: int, slots: np.ndarray, rows: int) -> bool:
        """Before a call that routes ``rows`` rows to these slots: where several rows share an
        expert (a prefill), move its pages into GPU memory (CUDA), so that the matmul reads each
        expert from there rather than over the host link once per row. Returns whether it did.

        Slots of a streaming pool stay on the host otherwise (one row per expert in decode);
        the next host write moves the pages back. A no-op off CUDA. Not yet measured on a GPU.
        """
        cache = self.cache_of_layer[layer]
        if cache.holds_all or rows < 2 * len(slots):
            return False
        return cache.pool.slots_to_device(slots.tolist())

    def check_abort(self) -> None:
        """Between expert groups: let ``abort_check`` (set by generate) stop a long prefill."""
        if self.abort_check is not None:
            self.abort_check()

    def capacity(self, layer: int) -> int:
        """Slots available to one call of ``layer``."""
        return self.cache_of_layer[layer].pool.n_slots

    def ensure(self, layer: int, experts: np.ndarray) -> np.ndarray:
        """Make ``experts`` of ``layer`` resident (reading misses in parallel); return their slots."""
        return self.finish(self.begin(layer, experts))

    def begin(self, layer: int, experts: np.ndarray) -> "_PendingReads":
        """Give ``experts`` of ``layer`` slots (pinned) and start reading the misses; do not wait."""
        cache = self.cache_of_layer[layer]
        slots = np.empty(len(experts), dtype=np.int32)
        waits: list[tuple[Key, Future[int]]] = []
        filled: list[int] = []
        keys = [(layer, int(e)) for e in experts]
        if self.touched is not None:
            self.touched.update(keys)
        self._pinned.update(keys)
        self.drain_prefetch()  # predicted experts become ordinary resident ones
        for i, key in enumerate(keys):
            if cache.pending:
                cache.settle(key)  # being read by the warm start: wait for it (hot_set)
            slot = cache.lookup(key)
            if slot is not None:
                cache.hits += 1
                self.figures.cache_hits += 1
                if key in self._prefetched:
                    self._prefetched.discard(key)
                    self.prefetched_hits += 1
                slots[i] = slot
                continue
            cache.misses += 1
            self.figures.cache_misses += 1
            self._prefetched.discard(key)
            slot = cache.assign_or_wait(key, self._pinned)  # (waits for a warm-start read if it must)
            slots[i] = slot
            filled.append(slot)
            waits.append((key, self.store.submit(layer, key[1], cache.pool.dests(slot))))
        return _PendingReads(cache, keys, slots, waits, filled)

    def finish(self, pending: "_PendingReads") -> np.ndarray:
        """Wait for the reads ``begin`` started; return the slots of its experts, in its order."""
        cache, slots, waits, filled = pending.cache, pending.slots, pending.waits, pending.filled
        t0 = time.perf_counter()
        error: BaseException | None = None
        for key, fut in waits:
            try:
                self.figures.bytes_read += fut.result()
            except BaseException as e:  # keep waiting for the others, then report the first
                cache.forget(key)
                error = error or e
        if filled and cache.holds_all and error is None:  # experts that stay: into GPU memory (CUDA)
            cache.pool.slots_to_device(filled)
        self.figures.io_wait_s += time.perf_counter() - t0
        if error is not None:
            raise error
        return slots

    def device_table(self, layer: int) -> mx.array | None:
        """Slot of each expert of ``layer`` as a device array, when routing may skip the host.

        Only for a layer whose every expert is resident in a pool that holds all of its layers:
        no key of that pool is ever evicted, so the table stays valid without pinning.
        """
        cache = self.cache_of_layer[layer]
        if not (self.device_routing and cache.holds_all) or self.trace is not None or self.parallel is not None:
            return None  # (a trace needs the ids on the host; ranks read only their own experts)
        cached = self._luts.get(layer)
        if cached is not None and cached[0] == cache.version:
            return cached[1]
        if self._inflight:
            self.drain_prefetch()  # a slot being filled must not be read
        slots = cache.layer_slots(layer)
        if slots is None:
            return None
        table = mx.array(slots, dtype=mx.uint32)  # the routing's own dtype: no casts before the kernels
        self._luts[layer] = (cache.version, table)
        return table

    def preload(self) -> int:
        """Read every expert of the pools that hold all of their layers; return the bytes read.

        Afterwards those layers route on the device (see ``device_table``). Other pools are left
        as they are: they could not keep every expert anyway.
        """
        waits: list[tuple[ExpertCache, Key, Future[int]]] = []
        for layer in self.layers:
            cache = self.cache_of_layer[layer.layer]
            if not cache.holds_all:
                continue
            for e in range(layer.num_experts):
                key = (layer.layer, e)
                if key in cache or key in self._inflight:
                    continue
                if self.parallel is not None and not self.parallel.owns(np.array(e)):
                    continue  # another rank's expert
                slot = cache.assign(key, self._pinned)
                waits.append((cache, key, self.store.submit(layer.layer, e, cache.pool.dests(slot))))
        self.drain_prefetch()
        total = 0
        error: BaseException | None = None
        for cache, key, fut in waits:
            try:
                total += fut.result()
            except BaseException as e:  # wait for the others, then report the first
                cache.forget(key)
                error = error or e
        if error is not None:
            raise error
        for cache in {id(c): c for c, _, _ in waits}.values():
            cache.pool.slots_to_device(wait=True)  # experts that stay: into GPU memory (CUDA)
        return total

    def prefetch_experts(self, layer: int, experts: np.ndarray) -> None:
        """Start reading predicted experts of ``layer`` into free or unpinned slots; never wait."""
        cache = self.cache_of_layer[layer]
        for e in experts:
            key = (layer, int(e))
            if key in cache or key in self._inflight:
                continue
            busy = self._pinned | set(self._inflight)
            if len(busy) >= cache.pool.n_slots:
                return
            try:
                slot = cache.assign(key, busy)
            except RuntimeError:
                return
            self._inflight[key] = (cache, self.store.submit(layer, key[1], cache.pool.dests(slot)))

    def drain_prefetch(self) -> None:
        """Wait for outstanding prefetches; their experts become ordinary cache entries."""
        if not self._inflight:
            return
        t0 = time.perf_counter()
        for key, (cache, fut) in list(self._inflight.items()):
            try:
                self.figures.bytes_read += fut.result()
                self._prefetched.add(key)
            except BaseException:
                cache.forget(key)  # a failed guess costs nothing; a needed expert is read again
        self._inflight.clear()
        self.figures.io_wait_s += time.perf_counter() - t0


class StreamedSwitch(nn.Module):
    """Drop-in replacement of an mlx-lm switch module whose experts stream from the SSD.

    Every attribute and method of the replaced module stays reachable through this one (a
    family's MoE block may read the bank's sizes or call its helpers); extra call arguments
    after the routing indices go to the replaced module's own ``__call__`` unchanged.
    """

    def __init__(self, inner: nn.Module, layer: int, streamer: ExpertStreamer, param_keys: list[str]) -> None:
        super().__init__()
        self._binding = _Binding(inner, streamer, list(param_keys))
        self.layer = layer
        self.bind_slots()

    def bind_slots(self) -> None:
        """Point the replaced module's expert tensors at this layer's slot arrays (again after a
        cache resize has built new pools)."""
        self._point_at(self._binding.streamer.cache_of_layer[self.layer].pool.arrays)

    def _point_at(self, arrays: dict[str, mx.array]) -> None:
        """Set the replaced module's expert tensors (``param_keys``) to these arrays."""
        b = self._binding
        for key in b.param_keys:
            owner_name, attr = key.rsplit(".", 1)
            owner = b.inner
            for part in owner_name.split("."):
                owner = getattr(owner, part)
            setattr(owner, attr, arrays[key])

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name == "_binding":
                raise
            return getattr(self._binding.inner, name)

    @property
    def inner_module(self) -> nn.Module:
        """The mlx-lm switch module this layer runs (kept outside the model's parameter tree)."""
        return self._binding.inner

    def set_next_router(self, router: Callable[[mx.array], mx.array] | None) -> None:
        """Give this layer the next MoE layer's router (for next-layer prefetch)."""
        self._binding.next_router = router

    def __call__(self, x: mx.array, indices: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        b = self._binding
        b.extra = (args, kwargs)
        try:
            return self._route(x, indices)
        finally:
            b.extra = ((), {})

    def _route(self, x: mx.array, indices: mx.array) -> mx.array:
        b = self._binding
        streamer = b.streamer
        if streamer.skip_layer == self.layer:
            # Nothing downstream reads this output (prefill chunks keep only the KV caches):
            # no routing sync and no reads; the zeros never reach a logit.
            return mx.zeros((*indices.shape, x.shape[-1]), dtype=x.dtype)
        table = streamer.device_table(self.layer)
        if table is not None:
            # Every expert is resident and stays so: map ids to slots on the device, no sync.
            # Hits are counted per routed choice (the host never sees the ids).
            streamer.device_routed_calls += 1
            streamer.cache_of_layer[self.layer].hits += indices.size
            streamer.figures.cache_hits += indices.size
            return b.inner(x, table[indices], *b.extra[0], **b.extra[1])
        streamer.host_syncs += 1
        t0 = time.perf_counter()
        prediction = None
        if streamer.prefetch and b.next_router is not None:
            prediction = mx.argpartition(b.next_router(x), kth=-streamer.k, axis=-1)[..., -streamer.k :]
            mx.eval(indices, prediction)
        else:
            mx.eval(indices)
        t1 = time.perf_counter()
        streamer.figures.compute_s += t1 - t0
        io_before = streamer.figures.io_wait_s
        streamer.release_pins()
        host_idx = np.array(indices)
        if streamer.trace is not None:
            streamer.trace.record(self.layer, host_idx, streamer.in_prefill)
        if streamer.parallel is not None:  # several machines: this rank's experts, combined exactly
            y = streamer.parallel.run_layer(self, x, host_idx)
            streamer.figures.sync_s += time.perf_counter() - t1 - (streamer.figures.io_wait_s - io_before)
            return y
        unique = np.unique(host_idx)
        cap = streamer.capacity(self.layer)
        if len(unique) <= cap:
            y = self._run_group(x, host_idx, unique)
        else:
            y = self._run_grouped(x, host_idx, unique, cap)
        # Start the experts' compute now, while Python builds the graph up to the next router.
        # Its slots stay pinned until the next sync, which waits for this work.
        mx.async_eval(y)
        if prediction is not None:
            predicted = np.unique(np.array(prediction))
            streamer.prefetch_experts(self.layer + 1, predicted)
        # Host-side work at this sync point (remapping, bookkeeping), excluding the wait for reads.
        streamer.figures.sync_s += time.perf_counter() - t1 - (streamer.figures.io_wait_s - io_before)
        return y

    def run_pairs(self, rows: mx.array, experts: np.ndarray, call_pairs: int = 0) -> mx.array:
        """Row ``i`` of ``rows`` through expert ``experts[i]``: ``[n, hidden]`` (expert parallelism).

        ``call_pairs``: the pairs of the whole layer call these are a share of (0: these only);
        a share too small for that call's kernel is padded to it (kernel_shapes.pad_to).
        """
        host_idx = np.asarray(experts).reshape(-1, 1)
        unique = np.unique(host_idx)
        cap = self._binding.streamer.capacity(self.layer)
        call_pairs = max(call_pairs, int(host_idx.size))
        if len(unique) <= cap:
            host_slots, _ = self._slot_indices(host_idx, unique)
            y = self._call_padded(rows, host_slots, call_pairs)
        else:
            y = self._run_grouped(rows, host_idx, unique, cap, call_pairs)
        return y[:, 0, :]

    def _call_padded(self, rows: mx.array, host_slots: np.ndarray, call_pairs: int) -> mx.array:
        """``rows[i]`` (``[n, hidden]``) through slot ``host_slots[i]`` (``[n, 1]``), padded to ``call_pairs``'s kernel.

        The padding repeats the first pair; its outputs are dropped. (kernel_shapes.pad_to)
        """
        n = int(host_slots.shape[0])
        target = pad_to(n, call_pairs, self._binding.streamer.kernel_backend)
        if target > n:
            extra = target - n
            rows = mx.concatenate([rows, mx.broadcast_to(rows[:1], (extra, rows.shape[-1]))])
            host_slots = np.concatenate([host_slots, np.repeat(host_slots[:1], extra, axis=0)])
        y = self._call_inner(rows, host_slots, mx.array(host_slots, dtype=mx.uint32))
        return y[:n] if target > n else y

    def _slot_indices(self, host_idx: np.ndarray, unique: np.ndarray) -> tuple[np.ndarray, mx.array]:
        slots = self._binding.streamer.ensure(self.layer, unique)
        self._binding.streamer.place_for_rows(self.layer, slots, rows=int(host_idx.size))
        lut = np.zeros(int(unique.max()) + 1, dtype=np.int32)
        lut[unique] = slots
        host_slots = lut[host_idx]
        return host_slots, mx.array(host_slots, dtype=mx.uint32)  # (as argpartition's: no casts)

    def _call_inner(self, x: mx.array, host_slots: np.ndarray, slot_idx: mx.array) -> mx.array:
        """The switch module on slot ids; long calls tell the expert projections their runs."""
        b = self._binding
        mode = b.streamer.prefill_matmul
        if not mode.enabled or host_slots.size < mode.min_rows:
            if b.streamer.gather_slots and not b.streamer.cache_of_layer[self.layer].holds_all:
                used, compact = np.unique(host_slots, return_inverse=True)
                if len(used) <= GATHER_MAX_EXPERTS_PER_K * b.streamer.k:  # (the copy's memory is bounded)
                    return self._gathered(x, used, compact.reshape(host_slots.shape))
            return b.inner(x, slot_idx, *b.extra[0], **b.extra[1])
        mode.plan = np.unique(host_slots, return_counts=True)  # runs in the sorted call's order
        try:
            return b.inner(x, slot_idx, *b.extra[0], **b.extra[1])
        finally:
            mode.plan = None

    def _gathered(self, x: mx.array, used: np.ndarray, compact: np.ndarray) -> mx.array:
        """The switch module on a compact copy of slots ``used``, ids ``compact`` into it (``gather_slots``).

        On CUDA a streaming pool's slots stay in host memory and the expert kernels would read
        them over the host link from inside the matmul; one ``take`` per parameter copies them
        in bulk first. The kernels then run on the same bytes, with ids into the copy. (H100,
        the 397B expert shape, 40 experts a token: 32 ms in place, 10 ms gathered first, 0.8 ms
        in GPU memory: bench/gpu/cold_compute_probe.py.)
        """
        b = self._binding
        take = mx.array(used, dtype=mx.uint32)
        pool = b.streamer.cache_of_layer[self.layer].pool
        self._point_at({key: mx.take(pool.arrays[key], take, axis=0) for key in b.param_keys})
        try:
            ids = mx.array(compact, dtype=mx.uint32)
            return b.inner(x, ids, *b.extra[0], **b.extra[1])
        finally:
            self.bind_slots()

    def _run_group(self, x: mx.array, host_idx: np.ndarray, unique: np.ndarray) -> mx.array:
        return self._call_inner(x, *self._slot_indices(host_idx, unique))

    def _run_grouped(self, x: mx.array, host_idx: np.ndarray, unique: np.ndarray, cap: int, call_pairs: int = 0) -> mx.array:
        """More distinct experts than slots (long prefill passes with a small cache): go in groups.

        Each expert is read once per call; half of the pool's slots take the group being read
        while the other half's group computes, so reads overlap compute. Each (token, choice)
        pair is computed by the same kernel on the same rows (a small group is padded to the
        kernel of the whole call, ``call_pairs`` or this call's pairs); the pieces are put back in
        their original order before the model's weighted sum. ``check_abort`` runs between groups.
        """
        if self._binding.extra != ((), {}):
            raise UnsupportedModelError(
                f"expert layer {self.layer}: its MoE block passes the bank arguments besides the routing "
                "indices, which cannot be split into groups; raise the expert cache to at least "
                f"{len(unique)} experts per layer"
            )
        streamer = self._binding.streamer
        k = host_idx.shape[-1]
        d = x.shape[-1]
        flat_idx = host_idx.reshape(-1)
        x_rows = x.reshape(-1, d)
        by_expert = np.argsort(flat_idx, kind="stable")  # positions grouped by expert id
        sorted_ids = flat_idx[by_expert]
        # Two groups in flight when the pool allows it: one computing while the next is read.
        size = cap // 2 if cap >= 2 else cap
        groups = [unique[s : s + size] for s in range(0, len(unique), size)]
        bounds = np.searchsorted(sorted_ids, [int(g[0]) for g in groups] + [int(sorted_ids[-1]) + 1])
        pieces: list[mx.array] = []
        positions: list[np.ndarray] = []
        pending = streamer.begin(self.layer, groups[0])
        previous: tuple[list[Key], mx.array] | None = None
        for g, group in enumerate(groups):
            slots = streamer.finish(pending)
            streamer.place_for_rows(self.layer, slots, rows=int(bounds[g + 1] - bounds[g]))
            pos = np.sort(by_expert[bounds[g] : bounds[g + 1]])
            lut = np.zeros(int(group.max()) + 1, dtype=np.int32)
            lut[group] = slots
            host_slots = lut[flat_idx[pos]]
            rows = x_rows[mx.array(pos // k)]
            y = self._call_padded(rows, host_slots[:, None], max(call_pairs, int(host_idx.size)))[:, 0, :]
            mx.async_eval(y)
            pieces.append(y)
            positions.append(pos)
            if previous is not None:
                mx.eval(previous[1])  # the group before: its slots may be reused below
                streamer.unpin(previous[0])
            previous = (pending.keys, y)
            if g + 1 < len(groups):
                if 2 * size > cap:  # no room for two groups: this one must finish first
                    mx.eval(y)
                    streamer.unpin(pending.keys)
                    previous = None
                streamer.check_abort()
                pending = streamer.begin(self.layer, groups[g + 1])
        order = np.argsort(np.concatenate(positions))
        y = mx.concatenate(pieces, axis=0)[mx.array(order)]
        return y.reshape(*host_idx.shape, y.shape[-1])
