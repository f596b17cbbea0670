"""Replacement policies of the expert cache: which resident expert to evict next.

A policy sees every lookup of the cache it serves: ``touch`` (a hit), ``miss`` (a lookup of a key
that is not resident, just before it is given a slot), ``insert`` (a key became resident: after a
miss, or read ahead by prefetch, preload or warm start, which are not uses), ``remove`` (it left),
and answers ``victim``: the key to evict, never one of the keys the caller excludes (slots in use
by pending compute).

* ``lru``: least recently used.
* ``lru-layer``: least recently used within each layer, every layer held to an equal share of the
  pool once it is full (a layer whose experts churn cannot flush the others' reusable ones).
* ``lrfu``: least recently/frequently used. Each key scores the sum of ``2**(-age/half_life)``
  over all its past uses, whether resident or not, with ``age`` counted in lookups of the cache
  and the half-life a multiple of the cache's slot count (so one setting fits every size). A long
  half-life is LFU with ageing (a pinned hot set emerges); a short one is LRU.
* ``arc``, ``wtinylfu``, ``wtinylfu-ghost`` (the default, per layer: ``wtinylfu-ghost@layer``),
  ``wtinylfu-adaptive``, ``lru-adaptive``: see cache_policies_adaptive.
* ``lrfu-layer``: LRFU aged by each layer's own lookups.
* ``NAME@layer``: policy NAME run in each layer on an equal share of the pool.
* ``belady``: the offline optimum (evict the key used furthest in the future), for the replay tool:
  it needs the whole trace (``BeladyPolicy.next_use``).

Scores of LRFU are kept in the log domain, relative to a clock, so that all keys age together
without being visited: ``log2(score) + t/half_life`` never changes while a key is unused.
"""

from __future__ import annotations

import heapq
import math
from collections import OrderedDict
from typing import Callable, Protocol

Key = tuple[int, int]  # (layer, expert)


class ReplacementPolicy(Protocol):
    """Chooses which resident expert to evict."""

    def touch(self, key: Key) -> None:
        """Record a use of a resident key."""

    def miss(self, key: Key) -> None:
        """Record a use of a key that is not resident (it is about to be inserted)."""

    def insert(self, key: Key) -> None:
        """Record a newly resident key."""

    def remove(self, key: Key) -> None:
        """Forget a key that left the cache."""

    def victim(self, exclude: set[Key]) -> Key | None:
        """The key to evict next, never one in ``exclude``; None when every key is excluded."""


class LRUPolicy:
    """Evict the least recently used expert."""

    def __init__(self, n_slots: int = 0) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key) -> None:
        """Mark ``key`` most recently used."""
        self._order.move_to_end(key)

    def miss(self, key: Key) -> None:
        """Nothing to remember about keys that are not resident."""

    def insert(self, key: Key) -> None:
        """Add ``key`` as most recently used."""
        self._order[key] = None

    def remove(self, key: Key) -> None:
        """Forget ``key``."""
        self._order.pop(key, None)

    def victim(self, exclude: set[Key]) -> Key | None:
        """Least recently used key not in ``exclude``."""
        for key in self._order:
            if key not in exclude:
                return key
        return None

    def ranking(self) -> list[Key]:
        """Resident keys, most recently used first (for saving the hot set)."""
        return list(reversed(self._order))


class LayerLRUPolicy:
    """LRU per layer; a full pool evicts from the incoming key's layer when that layer holds its
    share (slots / layers) or more, else from the layer furthest over its share."""

    def __init__(self, n_slots: int, layers: int = 1) -> None:
        self.share = max(1, n_slots // max(1, layers))
        self._order: dict[int, OrderedDict[Key, None]] = {}
        self._incoming: Key | None = None  # the key of the last miss (about to be placed)

    def touch(self, key: Key) -> None:
        """Mark ``key`` most recently used in its layer."""
        self._order[key[0]].move_to_end(key)

    def miss(self, key: Key) -> None:
        """Remember whose slot is being sought."""
        self._incoming = key

    def insert(self, key: Key) -> None:
        """Add ``key`` as its layer's most recently used."""
        self._order.setdefault(key[0], OrderedDict())[key] = None
        if key == self._incoming:
            self._incoming = None

    def remove(self, key: Key) -> None:
        """Forget ``key``."""
        order = self._order.get(key[0])
        if order is not None:
            order.pop(key, None)

    @staticmethod
    def _oldest(order: OrderedDict[Key, None], exclude: set[Key]) -> Key | None:
        for key in order:
            if key not in exclude:
                return key
        return None

    def victim(self, exclude: set[Key]) -> Key | None:
        """The incoming layer's LRU key if it holds its share, else the LRU key of the layer
        furthest over its share (never one in ``exclude``)."""
        incoming = self._incoming
        if incoming is not None:
            own = self._order.get(incoming[0])
            if own is not None and len(own) >= self.share:
                found = self._oldest(own, exclude)
                if found is not None:
                    return found
        for order in sorted(self._order.values(), key=len, reverse=True):
            found = self._oldest(order, exclude)
            if found is not None:
                return found
        return None

    def ranking(self) -> list[Key]:
        """Resident keys, most recently used first within each layer, layers interleaved."""
        return interleave([list(reversed(order)) for order in self._order.values()])


def _log2_add(old: float | None, now: float) -> float:
    """log2(2**old + 2**now) without overflow (``now`` alone when there is no old score)."""
    if old is None:
        return now
    high, low = (old, now) if old >= now else (now, old)
    return high + math.log2(1.0 + 2.0 ** (low - high))


class _LazyMinHeap:
    """Resident keys ordered by a priority that only grows; stale heap entries are skipped."""

    def __init__(self) -> None:
        self.prio: dict[Key, float] = {}  # resident key -> current priority
        self._heap: list[tuple[float, Key]] = []

    def put(self, key: Key, prio: float) -> None:
        self.prio[key] = prio
        heapq.heappush(self._heap, (prio, key))
        if len(self._heap) > 4 * len(self.prio) + 64:
            self._heap = [(p, k) for k, p in self.prio.items()]
            heapq.heapify(self._heap)

    def discard(self, key: Key) -> None:
        self.prio.pop(key, None)

    def lowest(self, exclude: set[Key]) -> Key | None:
        """The resident key of lowest priority not in ``exclude`` (left in place)."""
        heap, prio = self._heap, self.prio
        skipped: list[tuple[float, Key]] = []
        found = None
        while heap:
            p, key = heap[0]
            if prio.get(key) != p:
                heapq.heappop(heap)  # stale: updated since, or no longer resident
                continue
            if key in exclude:
                skipped.append(heapq.heappop(heap))
                continue
            found = key
            break
        for item in skipped:
            heapq.heappush(heap, item)
        return found


class LRFUPolicy:
    """Evict the key with the lowest exponentially aged use count (recency and frequency).

    ``half_life`` is in multiples of the cache's slot count, counted in lookups; ``math.inf``
    gives plain LFU (never ages). Use counts are kept for keys that are not resident too, so an
    expert evicted by a burst of others comes back with its history.
    """

    def __init__(self, n_slots: int, half_life: float = 4.0) -> None:
        if not half_life > 0:  # (also refuses NaN)
            raise ValueError(f"LRFU half-life must be positive, got {half_life}")
        self._rate = 0.0 if math.isinf(half_life) else 1.0 / (half_life * max(1, n_slots))
        self._clock = 0  # lookups seen
        self._log_score: dict[Key, float] = {}  # log2(score) + clock * rate, for every key seen
        self._heap = _LazyMinHeap()

    def _use(self, key: Key) -> float:
        self._clock += 1
        now = self._clock * self._rate  # log2 of one use made now, in the shared frame
        new = self._log_score[key] = _log2_add(self._log_score.get(key), now)
        return new

    def touch(self, key: Key) -> None:
        """A hit: one more use of a resident key."""
        self._heap.put(key, self._use(key))

    def miss(self, key: Key) -> None:
        """A use of a key about to become resident."""
        self._use(key)

    def insert(self, key: Key) -> None:
        """``key`` is resident, ranked by its use history (none for a key read ahead of use)."""
        score = self._log_score.get(key)
        self._heap.put(key, score if score is not None else -math.inf)

    def remove(self, key: Key) -> None:
        """``key`` left the cache (its history is kept)."""
        self._heap.discard(key)

    def victim(self, exclude: set[Key]) -> Key | None:
        """The resident key with the lowest aged use count, not in ``exclude``."""
        return self._heap.lowest(exclude)

    def ranking(self) -> list[Key]:
        """Every key seen, most valuable first (for saving the hot set)."""
        return sorted(self._log_score, key=self._log_score.__getitem__, reverse=True)


class LayerClockLRFUPolicy(LRFUPolicy):
    """LRFU whose ages count the lookups of the key's own layer, not of the whole pool.

    Every layer is looked up k times per token, so these clocks all run at one rate and a score
    reads as an estimate of how often the expert is routed to now, comparable between layers
    (with the pool's clock, a layer late in the token looks up to one token fresher than the
    first). ``half_life`` is in multiples of one layer's share of the slots.
    """

    def __init__(self, n_slots: int, layers: int = 1, half_life: float = 1.0) -> None:
        super().__init__(max(1, n_slots // max(1, layers)), half_life)
        self._clocks: dict[int, int] = {}

    def _use(self, key: Key) -> float:
        clock = self._clocks.get(key[0], 0) + 1
        self._clocks[key[0]] = clock
        new = self._log_score[key] = _log2_add(self._log_score.get(key), clock * self._rate)
        return new


class BeladyPolicy:
    """Belady's offline optimum: evict the key whose next use is furthest away.

    The replay sets ``next_use`` (the lookup index of the current key's next use, ``math.inf``
    when never) before each lookup; the policy files it under the key on touch or miss.
    """

    def __init__(self, n_slots: int = 0) -> None:
        self.next_use = math.inf
        self._next: dict[Key, float] = {}
        self._heap = _LazyMinHeap()  # priority: -next use

    def touch(self, key: Key) -> None:
        """A hit: remember when the key is needed next."""
        self._next[key] = self.next_use
        self._heap.put(key, -self.next_use)

    def miss(self, key: Key) -> None:
        """A miss: remember when the key is needed next."""
        self._next[key] = self.next_use

    def insert(self, key: Key) -> None:
        """``key`` is resident."""
        self._heap.put(key, -self._next.get(key, math.inf))

    def remove(self, key: Key) -> None:
        """``key`` left the cache."""
        self._heap.discard(key)

    def victim(self, exclude: set[Key]) -> Key | None:
        """The resident key needed furthest in the future, not in ``exclude``."""
        return self._heap.lowest(exclude)


class PerLayerPolicy:
    """Any policy run separately in each layer on an equal share of the pool (``NAME@layer``): a
    full pool evicts the incoming key's layer's victim when that layer holds its share or more,
    else the victim of the layer furthest over its share (as ``lru-layer`` does for LRU)."""

    def __init__(self, n_slots: int, layers: int, inner: Callable[[int], ReplacementPolicy]) -> None:
        self.share = max(1, n_slots // max(1, layers))
        self._inner = inner
        self._layers: dict[int, ReplacementPolicy] = {}
        self._count: dict[int, int] = {}
        self._incoming: Key | None = None

    def _of(self, layer: int) -> ReplacementPolicy:
        policy = self._layers.get(layer)
        if policy is None:
            policy = self._layers[layer] = self._inner(self.share)
            self._count[layer] = 0
        return policy

    def touch(self, key: Key) -> None:
        """A hit, for the key's layer's policy."""
        self._of(key[0]).touch(key)

    def miss(self, key: Key) -> None:
        """A miss, for the key's layer's policy."""
        self._incoming = key
        self._of(key[0]).miss(key)

    def insert(self, key: Key) -> None:
        """Resident, in the key's layer (the miss it answered, if any, is settled)."""
        if key == self._incoming:
            self._incoming = None  # a later assign without a miss (prefetch) must not evict for it
        self._of(key[0]).insert(key)
        self._count[key[0]] += 1

    def remove(self, key: Key) -> None:
        """Gone from the key's layer."""
        if key[0] in self._layers:
            self._layers[key[0]].remove(key)
            self._count[key[0]] -= 1

    def victim(self, exclude: set[Key]) -> Key | None:
        """The incoming layer's victim at its share, else that of the layer furthest over."""
        incoming = self._incoming
        if incoming is not None and self._count.get(incoming[0], 0) >= self.share:
            found = self._layers[incoming[0]].victim(exclude)
            if found is not None:
                return found
        for layer in sorted(self._count, key=self._count.__getitem__, reverse=True):
            found = self._layers[layer].victim(exclude)
            if found is not None:
                return found
        return None

    def ranking(self) -> list[Key]:
        """Each layer's ranking (where its policy has one), layers interleaved."""
        return interleave([list(getattr(p, "ranking", lambda: [])()) for p in self._layers.values()])


PolicyFactory = Callable[[int, int], ReplacementPolicy]  # (slots, layers sharing them)

# Engine policies by name; each takes the cache's slot count and the number of layers sharing it.
# The default (DEFAULT_POLICY, below) was chosen by replaying traces with ``moebar-engine
# cache-sim`` (see BENCHMARKS.md, "Expert cache policy").
POLICIES: dict[str, PolicyFactory] = {
    "lru": lambda n, layers: LRUPolicy(n),
    "lru-layer": LayerLRUPolicy,
    "lrfu": lambda n, layers: LRFUPolicy(n, half_life=1.0),
    "lfu": lambda n, layers: LRFUPolicy(n, half_life=math.inf),
}

from engine.model.cache_policies_adaptive import (  # noqa: E402
    AdaptiveLayerLRUPolicy, AdaptiveWTinyLFUPolicy, ARCPolicy, GhostWTinyLFUPolicy, WTinyLFUPolicy, interleave,
)  # fmt: skip

POLICIES.update({
    "arc": ARCPolicy, "wtinylfu": WTinyLFUPolicy, "lru-adaptive": AdaptiveLayerLRUPolicy,
    "lrfu-layer": LayerClockLRFUPolicy, "wtinylfu-adaptive": AdaptiveWTinyLFUPolicy,
    "wtinylfu-ghost": GhostWTinyLFUPolicy,
})  # fmt: skip


def make_policy(name: str, n_slots: int, layers: int = 1) -> ReplacementPolicy:
    """The policy called ``name`` for a cache of ``n_slots`` shared by ``layers`` layers;
    ``lrfu:H`` sets LRFU's half-life H (in multiples of ``n_slots`` lookups), ``wtinylfu:W`` the
    W-TinyLFU window's share W of the slots; ``NAME@layer`` runs policy NAME in each layer on an
    equal share (``lru@layer`` is ``lru-layer``)."""
    if name.endswith("@layer") and "@" not in name[: -len("@layer")]:
        inner = name[: -len("@layer")]
        make_policy(inner, 1)  # refuses an unknown inner name now
        return PerLayerPolicy(n_slots, layers, lambda share: make_policy(inner, share, 1))
    base, _, arg = name.partition(":")
    if base in ("lrfu", "wtinylfu", "lrfu-layer") and arg:
        try:
            value = float(arg)
        except ValueError:
            raise ValueError(f"cache policy {name!r}: the value after ':' must be a number") from None
        if base == "lrfu":
            return LRFUPolicy(n_slots, half_life=value)
        if base == "lrfu-layer":
            return LayerClockLRFUPolicy(n_slots, layers, half_life=value)
        return WTinyLFUPolicy(n_slots, layers, window=value)
    if base not in POLICIES or arg:
        raise ValueError(
            f"unknown cache policy {name!r}; known: {', '.join(POLICIES)}, lrfu:HALF_LIFE, lrfu-layer:HALF_LIFE, wtinylfu:WINDOW, NAME@layer"
        )
    return POLICIES[base](n_slots, layers)

DEFAULT_POLICY = "wtinylfu-ghost@layer"  # the engine's policy, chosen with cache-sim (BENCHMARKS.md, "Expert cache policy")


def is_policy_name(name: str) -> bool:
    """Whether ``make_policy`` knows ``name``."""
    try:
        make_policy(name, 1)
    except ValueError:
        return False
    return True
