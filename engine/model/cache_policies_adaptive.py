"""More replacement policies of the expert cache (the protocol is in cache_policies).

* ``arc``: Adaptive Replacement Cache (Megiddo and Modha, 2003) over the whole pool: a list of
  keys used once (T1) and one of keys used again (T2), ghost lists of keys recently evicted from
  each (B1, B2), and a target size ``p`` of T1 that a ghost hit moves toward the list that would
  have kept the key.
* ``wtinylfu``: W-TinyLFU-style admission: a newcomer enters a small LRU window; a key leaving the
  window replaces the main segment's victim (segmented LRU: probation, protected) only if it was
  used more often, by aged use counts (all halved every ``10 x slots`` lookups, as TinyLFU resets
  its sketch). The key space is small (layers x experts), so the counts are exact: a count-min
  sketch would only add collisions.
* ``wtinylfu-adaptive``: W-TinyLFU whose window share is tuned online by hill climbing on the
  hit rate (as Caffeine does): every period of lookups, the window moves one step in the
  direction that raised the hit rate last time, or turns back; the step shrinks over time.
* ``wtinylfu-ghost``: W-TinyLFU whose window is sized as ARC sizes its recency list: keys
  dropped from the window (refused by admission) and keys evicted from the main area are kept as
  ghosts; a miss on a window ghost grows the window by a slot (recency would have kept it), a
  miss on a main ghost shrinks it (frequency would have).
* ``lru-adaptive``: LRU within each layer, each layer's share of the pool adapted online: every
  layer keeps a ghost list of its recently evicted keys, a miss found there (it would have hit
  with a few more slots) raises the layer's target, and a full pool evicts from the layer furthest
  over its target. Targets settle where layers' ghost hit rates (marginal hits per slot) are equal,
  which is where unequal budgets fitted to each layer's curve would put them.
"""

from __future__ import annotations

from collections import OrderedDict

Key = tuple[int, int]  # (layer, expert), as in cache_policies (which imports this module)


def _oldest(order: "OrderedDict[Key, None]", exclude: set[Key]) -> Key | None:
    for key in order:
        if key not in exclude:
            return key
    return None


def interleave(lists: list[list[Key]]) -> list[Key]:
    """The first of every list, then the second of every list, ... (layers' rankings into one)."""
    return [lst[i] for i in range(max(map(len, lists), default=0)) for lst in lists if i < len(lst)]


class ARCPolicy:
    """Adaptive Replacement Cache over ``n_slots`` (see the module docstring)."""

    def __init__(self, n_slots: int, layers: int = 1) -> None:
        self.c = max(1, n_slots)
        self.p = 0.0  # target size of T1
        self.t1: OrderedDict[Key, None] = OrderedDict()
        self.t2: OrderedDict[Key, None] = OrderedDict()
        self.b1: OrderedDict[Key, None] = OrderedDict()
        self.b2: OrderedDict[Key, None] = OrderedDict()
        self._ghost_hit: dict[Key, str] = {}  # key of a miss -> "b1"/"b2" (where it was found)
        self._last_miss_in_b2 = False

    def touch(self, key: Key) -> None:
        """A hit: the key moves to T2's most recent end."""
        if key in self.t1:
            del self.t1[key]
        self.t2[key] = None
        self.t2.move_to_end(key)

    def miss(self, key: Key) -> None:
        """A miss: a ghost hit adapts ``p`` toward the list that would have kept ``key``."""
        if key in self.b1:
            self.p = min(float(self.c), self.p + max(len(self.b2) / len(self.b1), 1.0))
            del self.b1[key]
            self._ghost_hit[key] = "b1"
        elif key in self.b2:
            self.p = max(0.0, self.p - max(len(self.b1) / len(self.b2), 1.0))
            del self.b2[key]
            self._ghost_hit[key] = "b2"
        self._last_miss_in_b2 = self._ghost_hit.get(key) == "b2"

    def insert(self, key: Key) -> None:
        """Resident: into T2 after a ghost hit (used before), else T1 (first use or read ahead)."""
        if self._ghost_hit.pop(key, None) is not None:
            self.t2[key] = None
        else:
            self.t1[key] = None

    def remove(self, key: Key) -> None:
        """``key`` left the cache: it becomes a ghost of the list it was in."""
        if key in self.t1:
            del self.t1[key]
            self.b1[key] = None
        elif key in self.t2:
            del self.t2[key]
            self.b2[key] = None
        self._trim()

    def _trim(self) -> None:
        while self.b1 and len(self.t1) + len(self.b1) > self.c:
            self.b1.popitem(last=False)
        while self.b2 and len(self.t1) + len(self.t2) + len(self.b1) + len(self.b2) > 2 * self.c:
            self.b2.popitem(last=False)

    def victim(self, exclude: set[Key]) -> Key | None:
        """ARC's REPLACE: T1's LRU key when T1 is over its target ``p``, else T2's."""
        t1_first = bool(self.t1) and (len(self.t1) > self.p or (self._last_miss_in_b2 and len(self.t1) >= self.p))
        first, second = (self.t1, self.t2) if t1_first else (self.t2, self.t1)
        found = _oldest(first, exclude)
        return found if found is not None else _oldest(second, exclude)

    def ranking(self) -> list[Key]:
        """Resident keys, used-again ones first, most recent first within each list."""
        return list(reversed(self.t2)) + list(reversed(self.t1))


class WTinyLFUPolicy:
    """A window LRU, a segmented-LRU main area and frequency-based admission between them."""

    def __init__(self, n_slots: int, layers: int = 1, window: float = 0.01) -> None:
        if not 0 < window < 1:
            raise ValueError(f"W-TinyLFU window must be a fraction in (0, 1), got {window}")
        n = max(1, n_slots)
        self.window_cap = max(1, round(window * n))
        self.protected_cap = max(1, round(0.8 * max(1, n - self.window_cap)))
        self.window: OrderedDict[Key, None] = OrderedDict()
        self.probation: OrderedDict[Key, None] = OrderedDict()
        self.protected: OrderedDict[Key, None] = OrderedDict()
        self.count: dict[Key, int] = {}
        self._samples = 0
        self._reset_every = 10 * n

    def _use(self, key: Key) -> None:
        self.count[key] = self.count.get(key, 0) + 1
        self._samples += 1
        if self._samples >= self._reset_every:  # age: halve every count, drop the zeros
            self._samples //= 2
            self.count = {k: c // 2 for k, c in self.count.items() if c > 1}

    def touch(self, key: Key) -> None:
        """A hit: counted; a probation key is promoted to protected."""
        self._use(key)
        if key in self.window:
            self.window.move_to_end(key)
        elif key in self.probation:
            del self.probation[key]
            self.protected[key] = None
            while len(self.protected) > self.protected_cap:  # demote protected's LRU key
                demoted, _ = self.protected.popitem(last=False)
                self.probation[demoted] = None
        else:
            self.protected.move_to_end(key)

    def miss(self, key: Key) -> None:
        """A miss: counted."""
        self._use(key)

    def insert(self, key: Key) -> None:
        """A newcomer enters the window; the window's overflow moves into probation."""
        self.window[key] = None
        while len(self.window) > self.window_cap:
            moved, _ = self.window.popitem(last=False)
            self.probation[moved] = None

    def remove(self, key: Key) -> None:
        """Forget ``key`` (its count stays)."""
        for area in (self.window, self.probation, self.protected):
            if key in area:
                del area[key]
                return

    def victim(self, exclude: set[Key]) -> Key | None:
        """The window's candidate or the main victim, whichever was used less (ties: the candidate)."""
        candidate = _oldest(self.window, exclude) if len(self.window) >= self.window_cap else None
        main = _oldest(self.probation, exclude)
        if main is None:
            main = _oldest(self.protected, exclude)
        if candidate is None or main is None:
            if candidate is None and main is None:
                return _oldest(self.window, exclude)
            return main if candidate is None else candidate
        return main if self.count.get(candidate, 0) > self.count.get(main, 0) else candidate

    def ranking(self) -> list[Key]:
        """Resident keys, most used first."""
        keys = [*self.window, *self.probation, *self.protected]
        return sorted(keys, key=lambda k: self.count.get(k, 0), reverse=True)


class AdaptiveWTinyLFUPolicy(WTinyLFUPolicy):
    """W-TinyLFU with its window share climbed toward the best hit rate (see the module docstring)."""

    def __init__(self, n_slots: int, layers: int = 1, window: float = 0.5, step: float = 0.1) -> None:
        super().__init__(n_slots, layers, window)
        self.n = max(1, n_slots)
        self.share = window
        self.step = step
        self.period = max(3000, 4 * self.n)
        self._seen = 0
        self._hits = 0
        self._last_rate: float | None = None

    def _resize(self) -> None:
        self.window_cap = max(1, min(self.n - 1, round(self.share * self.n)))
        self.protected_cap = max(1, round(0.8 * max(1, self.n - self.window_cap)))

    def _sample(self, hit: bool) -> None:
        self._seen += 1
        self._hits += hit
        if self._seen < self.period:
            return
        rate = self._hits / self._seen
        if self._last_rate is not None and rate < self._last_rate:
            self.step = -self.step * 0.7  # worse: turn back, with a smaller step
        self._last_rate = rate
        self.share = min(0.99, max(0.01, self.share + self.step))
        self._resize()
        self._seen = self._hits = 0

    def touch(self, key: Key) -> None:
        """A hit: counted for the climb, then as in W-TinyLFU."""
        self._sample(True)
        super().touch(key)

    def miss(self, key: Key) -> None:
        """A miss: counted for the climb, then as in W-TinyLFU."""
        self._sample(False)
        super().miss(key)


class GhostWTinyLFUPolicy(WTinyLFUPolicy):
    """W-TinyLFU with an ARC-style window size (see the module docstring)."""

    def __init__(self, n_slots: int, layers: int = 1, window: float = 0.5) -> None:
        super().__init__(n_slots, layers, window)
        self.n = max(2, n_slots)
        self.ghost_w: OrderedDict[Key, None] = OrderedDict()
        self.ghost_m: OrderedDict[Key, None] = OrderedDict()

    def _set_window(self, cap: int) -> None:
        self.window_cap = max(1, min(self.n - 1, cap))
        self.protected_cap = max(1, round(0.8 * max(1, self.n - self.window_cap)))

    def miss(self, key: Key) -> None:
        """A miss; one on a ghost moves the window's size toward the side that would have kept it."""
        if key in self.ghost_w:
            del self.ghost_w[key]
            self._set_window(self.window_cap + max(1, round(len(self.ghost_m) / max(1, len(self.ghost_w)))))
        elif key in self.ghost_m:
            del self.ghost_m[key]
            self._set_window(self.window_cap - max(1, round(len(self.ghost_w) / max(1, len(self.ghost_m)))))
        super().miss(key)

    def insert(self, key: Key) -> None:
        """Resident: no longer a ghost (a slot filled without a miss first: prefetch, warm start)."""
        self.ghost_w.pop(key, None)
        self.ghost_m.pop(key, None)
        super().insert(key)

    def remove(self, key: Key) -> None:
        """``key`` left: a ghost of the window or of the main area (of one of them only)."""
        ghosts, other = (self.ghost_w, self.ghost_m) if key in self.window else (self.ghost_m, self.ghost_w)
        super().remove(key)
        other.pop(key, None)
        ghosts[key] = None
        while len(ghosts) > self.n:
            ghosts.popitem(last=False)


class AdaptiveLayerLRUPolicy:
    """LRU per layer with per-layer targets moved by ghost hits (see the module docstring)."""

    def __init__(self, n_slots: int, layers: int = 1, step: float = 0.5, ghost: float = 0.25, floor: int = 0) -> None:
        self.n = max(1, n_slots)
        self.layers = max(1, layers)
        equal = self.n / self.layers
        self.step = step  # slots a ghost hit adds to its layer's target
        self.ghost_cap = max(2, round(ghost * equal))  # ghost keys kept per layer
        self.floor = max(1.0, float(floor) if floor else min(equal, 0.25 * equal))
        self.target: dict[int, float] = {}
        self._order: dict[int, OrderedDict[Key, None]] = {}
        self._ghost: dict[int, OrderedDict[Key, None]] = {}
        self._incoming: Key | None = None
        self._equal = equal

    def _layer(self, layer: int) -> OrderedDict[Key, None]:
        order = self._order.get(layer)
        if order is None:
            order = self._order[layer] = OrderedDict()
            self._ghost[layer] = OrderedDict()
            self.target[layer] = self._equal
        return order

    def touch(self, key: Key) -> None:
        """Mark ``key`` most recently used in its layer."""
        self._order[key[0]].move_to_end(key)

    def miss(self, key: Key) -> None:
        """A miss; one found in its layer's ghost list moves a little budget to that layer."""
        self._incoming = key
        self._layer(key[0])
        ghost = self._ghost[key[0]]
        if key in ghost:
            del ghost[key]
            self._shift(key[0])

    def _shift(self, layer: int) -> None:
        """Raise ``layer``'s target by ``step``, taken evenly from the other layers above the floor."""
        donors = [l for l, t in self.target.items() if l != layer and t > self.floor]
        if not donors:
            return
        each = self.step / len(donors)
        given = 0.0
        for l in donors:
            take = min(each, self.target[l] - self.floor)
            self.target[l] -= take
            given += take
        self.target[layer] += given

    def insert(self, key: Key) -> None:
        """Add ``key`` as its layer's most recently used."""
        self._layer(key[0])[key] = None
        self._ghost[key[0]].pop(key, None)
        if key == self._incoming:
            self._incoming = None

    def remove(self, key: Key) -> None:
        """``key`` left the cache: it becomes a ghost of its layer."""
        order = self._order.get(key[0])
        if order is not None and key in order:
            del order[key]
            ghost = self._ghost[key[0]]
            ghost[key] = None
            if len(ghost) > self.ghost_cap:
                ghost.popitem(last=False)

    def victim(self, exclude: set[Key]) -> Key | None:
        """The incoming layer's LRU key if it holds its target or more, else the LRU key of the
        layer furthest over its target (never one in ``exclude``)."""
        incoming = self._incoming
        if incoming is not None:
            own = self._order.get(incoming[0])
            if own is not None and len(own) >= self.target[incoming[0]]:
                found = _oldest(own, exclude)
                if found is not None:
                    return found
        over = sorted(self._order, key=lambda l: len(self._order[l]) - self.target[l], reverse=True)
        for layer in over:
            found = _oldest(self._order[layer], exclude)
            if found is not None:
                return found
        return None

    def ranking(self) -> list[Key]:
        """Resident keys, most recently used first within each layer, layers interleaved."""
        return interleave([list(reversed(order)) for order in self._order.values()])
