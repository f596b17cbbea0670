"""What is resident: stacked MLX slot arrays that hold experts, and which expert is in which slot.

A ``SlotPool`` is one set of stacked arrays (``[slots, *per_expert_shape]`` per parameter) that
the compute reads with ``gather_qmm`` and the I/O threads write through NumPy views of the same
memory (no copy into MLX). An ``ExpertCache`` maps ``(layer, expert)`` to a slot with a
pluggable replacement policy and counts hits and misses. Slots used by computation that is not
yet evaluated are pinned and never chosen as victims. A cache that knows its layers' expert counts
can say when it holds every expert of a layer, and where each one is (``layer_slots``).

Warm start fills free slots from another thread (``claim_free``): such keys are pending until
their read ends, never evicted meanwhile, and a lookup that needs one waits for it (``settle``).
The cache's own state is guarded by a lock for that.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Hashable, Iterable, Union

import mlx.core as mx
import numpy as np

from engine.model import cuda_memory
from engine.model.cache_policies import POLICIES, Key, LRUPolicy, ReplacementPolicy, make_policy
from engine.storage.expert_layout import ExpertParam
from engine.storage.expert_store import page_aligned_empty

_MX_DTYPES = {
    "BOOL": mx.bool_, "U8": mx.uint8, "I8": mx.int8, "U16": mx.uint16, "I16": mx.int16,
    "F16": mx.float16, "BF16": mx.bfloat16, "U32": mx.uint32, "I32": mx.int32, "F32": mx.float32,
    "U64": mx.uint64, "I64": mx.int64,
}  # fmt: skip

__all__ = [
    "POLICIES", "ConvertBuffer", "ExpertCache", "Key", "LRUPolicy", "ReplacementPolicy", "SlotPool", "slot_dtype",
    "slot_param_nbytes",
]  # fmt: skip


_HALF_FLOATS = ("BF16", "F16")
_ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}


def slot_dtype(stored: str, slot_floats: str) -> str:
    """The dtype a parameter stored as ``stored`` has in a slot.

    ``slot_floats``: "F32" widens 16-bit floats (fp32 activations), "BF16" narrows fp32 and fp16
    to bf16 (bf16 activations: what mlx-lm's ``set_dtype(bfloat16)`` does to scales and biases),
    "" keeps every parameter as stored.
    """
    if slot_floats == "F32" and stored in _HALF_FLOATS:
        return "F32"
    if slot_floats == "BF16" and stored in ("F32", "F16"):
        return "BF16"
    return stored


def slot_param_nbytes(param: ExpertParam, slot_floats: str) -> int:
    """Bytes one expert's ``param`` takes in a slot (see ``slot_dtype``)."""
    held = slot_dtype(param.dtype, slot_floats)
    return param.nbytes if held == param.dtype else param.nbytes * _ITEMSIZE[held] // _ITEMSIZE[param.dtype]


def _fp32_to_bf16_bits(values: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, rounded to nearest even as MLX's cast does (NaN -> 0x7FC0)."""
    bits = values.view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    rounded[np.isnan(values)] = 0x7FC0
    return rounded


@dataclass
class ConvertBuffer:
    """A float parameter read into ``raw`` as stored, then converted into ``target`` (the slot).

    Widening (bf16/fp16 -> fp32) is exact; narrowing (fp32/fp16 -> bf16) rounds to nearest even,
    bit for bit what ``astype(mx.bfloat16)`` gives.
    """

    raw: np.ndarray  # uint8, the bytes as stored on disk
    target: np.ndarray  # uint8 view of the slot memory
    dtype: str  # the stored dtype: "BF16", "F16" or "F32"
    to: str = "F32"  # the slot's dtype: "F32" or "BF16"

    def finish(self) -> None:
        """Write the converted values into the slot."""
        if self.to == "F32":
            if self.dtype == "BF16":  # bf16 is the top half of an fp32: widen, then shift (no temporaries)
                bits = self.target.view(np.uint32)
                np.copyto(bits, self.raw.view(np.uint16), casting="unsafe")
                np.left_shift(bits, 16, out=bits)
            else:
                np.copyto(self.target.view(np.float32), self.raw.view(np.float16))
            return
        if self.to != "BF16":
            raise ValueError(f"a slot cannot hold {self.dtype} as {self.to}")
        wide = self.raw.view(np.float32) if self.dtype == "F32" else self.raw.view(np.float16).astype(np.float32)
        self.target.view(np.uint16)[:] = _fp32_to_bf16_bits(wide)


SlotDest = Union[np.ndarray, ConvertBuffer]


class SlotPool:
    """Stacked MLX arrays with ``n_slots`` expert slots, writable from NumPy without copies.

    ``slot_floats`` (see ``slot_dtype``): "F32" (fp32 activations) holds 16-bit scales and biases
    as fp32: MLX promotes them anyway next to fp32 activations, and doing it in the kernel's
    inputs converts the whole stacked array on every call; widening once per read is cheaper.
    "BF16" (bf16 activations) holds fp32/fp16 ones as bf16, as mlx-lm's ``set_dtype`` makes them.
    """

    def __init__(self, params: list[ExpertParam], n_slots: int, *, slot_floats: str = "") -> None:
        self.params = params
        self.n_slots = n_slots
        self.arrays: dict[str, mx.array] = {}
        self._raw: list[mx.array] = []
        self._views: list[np.ndarray] = []  # uint8 [n_slots, slot bytes] per parameter
        self._held = [slot_dtype(p.dtype, slot_floats) for p in params]
        for p, held in zip(params, self._held):
            arr = mx.zeros((n_slots, *p.shape), dtype=_MX_DTYPES[held])
            raw = mx.view(arr, mx.uint8)
            mx.eval(arr, raw)
            view = np.array(raw, copy=False).reshape(n_slots, slot_param_nbytes(p, slot_floats))
            self.arrays[p.key] = arr
            self._raw.append(raw)
            self._views.append(view)
        self._check_shared_memory()

    def _check_shared_memory(self) -> None:
        """Writes through the NumPy view must land in the MLX array (a zero-copy contract)."""
        if not self.params:
            return
        view, arr = self._views[0], self.arrays[self.params[0].key]
        view[0, :1] = 1
        probe = np.array(mx.view(arr[:1], mx.uint8)).reshape(-1)[0]
        view[0, :1] = 0
        if probe != 1:
            raise RuntimeError("MLX slot arrays do not share memory with their NumPy views on this platform")

    def dests(self, slot: int) -> list[SlotDest]:
        """Where to read each parameter of ``slot``, in parameter order: the slot's bytes, or a
        ConvertBuffer whose ``finish()`` converts what was read into the slot."""
        return [
            ConvertBuffer(page_aligned_empty(p.nbytes), v[slot], p.dtype, held) if held != p.dtype else v[slot]
            for p, v, held in zip(self.params, self._views, self._held)
        ]

    def prefer_host(self) -> bool:
        """On CUDA, keep the pool's pages on the host, read by the GPU in place (streaming pools)."""
        return cuda_memory.prefer_host(self._views)

    def slots_to_device(self, slots: Iterable[int] | None = None, *, wait: bool = False) -> bool:
        """On CUDA, move these slots' pages (all when None) to GPU memory (pools that keep experts)."""
        buffers = self._views if slots is None else [v[s] for s in slots for v in self._views]
        return cuda_memory.to_device(buffers, wait=wait)

    @property
    def nbytes(self) -> int:
        """Resident bytes of the pool."""
        return sum(v.nbytes for v in self._views)


class ExpertCache:
    """Maps (layer, expert) to slots of one pool; a replacement policy (cache_policies) over the slots."""

    def __init__(
        self,
        pool: SlotPool,
        policy: str | ReplacementPolicy = "lru",
        layer_experts: dict[int, int] | None = None,
    ) -> None:
        self.pool = pool
        # a name (see cache_policies.make_policy), or a policy object (the replay tool's Belady)
        layers = max(1, len(layer_experts or {}))
        self.policy: ReplacementPolicy = make_policy(policy, pool.n_slots, layers) if isinstance(policy, str) else policy
        self._slot_of: dict[Key, int] = {}
        self._key_of: dict[int, Key] = {}
        self._free = list(range(pool.n_slots - 1, -1, -1))
        self.hits = 0  # counted by the streamer, which knows what a lookup was for
        self.misses = 0
        self.layer_experts = dict(layer_experts or {})  # layer -> number of experts, for layer_slots
        self._resident_per_layer: dict[int, int] = {}
        self.version = 0  # changes whenever a key gains or loses a slot
        self.pending: dict[Key, Future[int]] = {}  # keys whose slot a warm-start read is filling
        self._lock = threading.RLock()

    @property
    def holds_all(self) -> bool:
        """Whether the pool has a slot for every expert of its layers (so nothing is ever evicted)."""
        return bool(self.layer_experts) and self.pool.n_slots >= sum(self.layer_experts.values())

    def layer_slots(self, layer: int) -> np.ndarray | None:
        """The slot of each expert ``0..E-1`` of ``layer`` when all are resident, else None."""
        n = self.layer_experts.get(layer)
        if n is None or self._resident_per_layer.get(layer, 0) < n:
            return None
        return np.array([self._slot_of[(layer, e)] for e in range(n)], dtype=np.int32)

    def _count(self, key: Key, delta: int) -> None:
        self._resident_per_layer[key[0]] = self._resident_per_layer.get(key[0], 0) + delta
        self.version += 1

    def lookup(self, key: Key) -> int | None:
        """The slot holding ``key`` (marked as used), or None (the policy notes the miss).

        A key whose warm-start read is still running is waited for first (never a slot that is
        being filled); a failed one is then a miss.
        """
        while True:
            with self._lock:
                if key not in self.pending:
                    slot = self._slot_of.get(key)
                    if slot is not None:
                        self.policy.touch(key)
                    else:
                        self.policy.miss(key)
                    return slot
            self.settle(key)

    def assign(self, key: Key, pinned: set[Key]) -> int:
        """Give ``key`` a slot (free, or evicted from an unpinned key); the caller fills it."""
        with self._lock:
            if self._free:
                slot = self._free.pop()
            else:
                victim = self.policy.victim(pinned | self.pending.keys() if self.pending else pinned)
                if victim is None:
                    raise RuntimeError(
                        f"expert cache: all {self.pool.n_slots} slots are pinned; cannot place {key}"
                    )
                slot = self._slot_of.pop(victim)
                self.policy.remove(victim)
                del self._key_of[slot]
                self._count(victim, -1)
            self._place(key, slot)
            return slot

    def assign_or_wait(self, key: Key, pinned: set[Key]) -> int:
        """``assign`` for a layer call, which must have its experts: when every unpinned slot is
        being filled by the warm start, wait for one of those reads (its key then becomes an
        ordinary victim, or its slot free if the read failed) instead of refusing."""
        while True:
            try:
                return self.assign(key, pinned)
            except RuntimeError:
                with self._lock:
                    filling = next((k for k in self.pending if k not in pinned), None)
                if filling is None:
                    raise
            self.settle(filling)  # outside the lock: the read's completion callback takes it

    def _place(self, key: Key, slot: int) -> None:
        self._slot_of[key] = slot
        self._key_of[slot] = key
        self.policy.insert(key)
        self._count(key, +1)

    def claim_free(self, key: Key, fill: "Callable[[int], Future[int]]") -> bool:
        """Warm start: place ``key`` in a free slot (never evicting) and start ``fill(slot)``.

        The key stays pending until the read ends; a failed read frees the slot again. Returns
        False when the key is resident already or no slot is free.
        """
        with self._lock:
            if key in self._slot_of or not self._free:
                return False
            slot = self._free.pop()
            self._place(key, slot)
            future = fill(slot)
            self.pending[key] = future
        future.add_done_callback(lambda f: self._end_pending(key, f))
        return True

    def _end_pending(self, key: Key, future: "Future[int]") -> None:
        with self._lock:
            if self.pending.get(key) is not future:
                return
            del self.pending[key]
            if future.exception() is not None:
                self.forget(key)

    def settle(self, key: Key) -> None:
        """Wait for a pending warm-start read of ``key`` (after which a failed one is forgotten)."""
        future = self.pending.get(key)
        if future is not None:
            try:
                future.result()
            except BaseException:
                pass  # _end_pending frees the slot; the lookup then misses and reads it again
            self._end_pending(key, future)

    def forget(self, key: Key) -> None:
        """Drop ``key`` (e.g. after a failed read) and free its slot."""
        with self._lock:
            slot = self._slot_of.pop(key, None)
            if slot is not None:
                del self._key_of[slot]
                self.policy.remove(key)
                self._free.append(slot)
                self._count(key, -1)

    def resident(self) -> Iterable[Hashable]:
        """Keys currently held."""
        return self._slot_of.keys()

    @property
    def free_slots(self) -> int:
        """Slots holding no expert."""
        return len(self._free)

    def hot_keys(self) -> list[Key]:
        """Resident keys, most valuable first by the policy's own ranking where it has one."""
        with self._lock:
            resident = list(self._slot_of)
            ranking = getattr(self.policy, "ranking", None)
            if ranking is None:
                return resident[::-1]  # no ranking: the most recently placed first
            order = {key: i for i, key in enumerate(ranking())}
            return sorted(resident, key=lambda key: order.get(key, len(order)))

    def __contains__(self, key: object) -> bool:
        return key in self._slot_of
