"""Warm start: the experts a model's cache held, saved by id and read back after the next load.

The hot set is a small JSON file per model (ids only, never weights), ranked by the cache policy
and kept in a folder the front-end chooses (the app: its cache folder; ``--hot-set-dir``). After
a load, ``HotSetWarmer`` reads those experts into *free* slots on a background thread: it never
evicts, keeps at most one read per I/O thread in flight, and pauses while a generation runs
(the streamer's layer-call counters move), so a request that arrives meanwhile is not held up;
an expert it needs that is still being read is waited for (it would have been read anyway).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from engine.model.expert_cache import Key
from engine.model.streamed_moe import ExpertStreamer

log = logging.getLogger(__name__)

HOT_SET_VERSION = 1


def hot_set_path(folder: str | Path, model_dir: str | Path) -> Path:
    """The hot-set file of ``model_dir`` inside ``folder`` (named by the model folder's path)."""
    resolved = str(Path(model_dir).expanduser().resolve())
    digest = hashlib.sha256(resolved.encode()).hexdigest()[:16]
    return Path(folder).expanduser() / f"{Path(resolved).name}-{digest}.json"


def save_hot_set(streamer: ExpertStreamer, path: Path, policy: str) -> int:
    """Write the ids the streamer's caches hold, best first per cache; return how many."""
    layers: dict[str, list[int]] = {}
    count = 0
    for cache in streamer.caches:
        if cache.holds_all:
            continue  # such pools are preloaded whole; nothing to learn
        for layer, expert in cache.hot_keys():
            layers.setdefault(str(layer), []).append(int(expert))
            count += 1
    if not count:
        return 0
    data = {
        "hot_set": HOT_SET_VERSION,
        "moe_layers": len(streamer.layers),
        "experts_per_layer": [l.num_experts for l in streamer.layers],
        "policy": policy,
        "layers": layers,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)
    return count


def read_hot_set(path: Path, streamer: ExpertStreamer) -> list[Key]:
    """The saved keys, interleaved across layers best first; [] (with a warning) when the file is
    absent, unreadable or from another model.

    Only the experts this process holds (a rank's share) and, once it has joined its ranks
    (``streamer.parallel``), only those its rank owns, even on the whole model: the others' experts
    would take slots of a pool sized to this rank's share.
    """
    parallel = streamer.parallel
    if not path.is_file():
        return []
    try:
        data: Any = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s: hot set ignored: not readable JSON (%s)", path, e)
        return []
    sizes = [l.num_experts for l in streamer.layers]
    if not isinstance(data, dict) or data.get("hot_set") != HOT_SET_VERSION:
        log.warning("%s: hot set ignored: field 'hot_set' is not %d", path, HOT_SET_VERSION)
        return []
    if data.get("moe_layers") != len(sizes) or data.get("experts_per_layer") != sizes:
        log.warning(
            "%s: hot set ignored: it is from another model (%r MoE layers, this model has %d)",
            path, data.get("moe_layers"), len(sizes),
        )  # fmt: skip
        return []
    per_layer: list[list[Key]] = []
    layers = data.get("layers")
    if not isinstance(layers, dict):
        log.warning("%s: hot set ignored: field 'layers' is not an object", path)
        return []
    for name, ids in layers.items():
        if not (name.isdigit() and int(name) < len(sizes) and isinstance(ids, list)):
            log.warning("%s: hot set ignored: bad layer entry %r", path, name)
            return []
        layer = int(name)
        if not all(isinstance(e, int) and 0 <= e < sizes[layer] for e in ids):
            log.warning("%s: hot set ignored: layer %d lists an expert id out of range", path, layer)
            return []
        per_layer.append([(layer, e) for e in ids if streamer.store.holds(layer, e)
                          and (parallel is None or e % parallel.size == parallel.rank)])
    keys: list[Key] = []
    for rank in range(max((len(p) for p in per_layer), default=0)):
        keys.extend(p[rank] for p in per_layer if rank < len(p))
    return keys


class HotSetWarmer:
    """Reads a hot set into free cache slots on a background thread (see the module docstring)."""

    IDLE_S = 0.2  # the streamer must have made no layer call for this long before reads go on

    def __init__(self, streamer: ExpertStreamer, keys: list[Key], max_in_flight: int) -> None:
        self.streamer = streamer
        self.keys = keys
        self.max_in_flight = max(1, max_in_flight)
        self.started = 0  # reads started
        self.bytes_read = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="moebar-warm-start", daemon=True)

    def start(self) -> "HotSetWarmer":
        """Begin in the background."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop starting reads and wait for those in flight."""
        self._stop.set()
        self._thread.join()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the warm start to finish; True when it has."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _calls(self) -> int:
        s = self.streamer
        return s.host_syncs + s.device_routed_calls

    def _wait_idle(self) -> int:
        """Return (the layer-call count) once no layer call happened for IDLE_S, or on stop."""
        seen = self._calls()
        quiet_since = time.monotonic()
        while not self._stop.is_set():
            now = self._calls()
            if now != seen:
                seen, quiet_since = now, time.monotonic()
            elif time.monotonic() - quiet_since >= self.IDLE_S:
                break
            self._stop.wait(0.02)
        return seen

    def _run(self) -> None:
        s = self.streamer
        in_flight: deque[Future[int]] = deque()
        seen = self._calls()
        try:
            for layer, expert in self.keys:
                if self._stop.is_set():
                    break
                while len(in_flight) >= self.max_in_flight:
                    self._finish(in_flight.popleft())
                if self._calls() != seen:  # a generation is running: wait until it has ended
                    seen = self._wait_idle()
                    if self._stop.is_set():
                        break
                cache = s.cache_of_layer[layer]
                if cache.holds_all:
                    continue
                box: list[Future[int]] = []

                def fill(slot: int, layer: int = layer, expert: int = expert, cache: Any = cache) -> Future[int]:
                    box.append(s.store.submit(layer, expert, cache.pool.dests(slot)))
                    return box[0]

                if cache.claim_free((layer, expert), fill):
                    self.started += 1
                    in_flight.append(box[0])
                elif not any(c.free_slots for c in s.caches if not c.holds_all):
                    break  # every pool is full: the warm start is done
            while in_flight:
                self._finish(in_flight.popleft())
        except Exception:  # a warm start is an optimisation: never take the engine down
            log.warning("warm start stopped", exc_info=True)

    def _finish(self, future: "Future[int]") -> None:
        try:
            self.bytes_read += future.result()
        except Exception as e:  # the slot was freed again (ExpertCache._end_pending)
            log.warning("warm start: a read failed (%s)", e)
