"""Expert parallelism across machines (mlx.distributed): each rank reads and runs its own experts.

Why per-expert ownership (expert ``e`` belongs to rank ``e % size``) rather than splitting every
routed expert's rows across ranks: ownership needs one collective per MoE layer and each rank
reads whole experts from its own disk (so ``pack`` can keep a rank's share only); a row split
balances reads exactly but needs a second collective per layer to gather the intermediate
activations, and splitting the intermediate dimension instead sums partial products in another
order, which is not exact. The busiest of two ranks reads about 6 of 10 routed experts on
average (DESIGN.md); the row split is not built, so that trade-off is not measured here.

Exactness: the switch module's output before the router-weighted sum has one row per (token,
choice) pair, ``[..., K, hidden]``. Each rank computes the rows of the pairs whose expert it owns
(the same kernel on the same row as in one process) and leaves the other rows exactly zero; an
``all_sum`` then adds, for every row, one computed value and zeros, and ``x + 0 == x``. Every rank
gets the same bits, runs the replicated dense part on them, and so computes the same logits; the
sampled token is still agreed on explicitly (rank 0's, broadcast), so a sampler without a seed
cannot split the ranks.

Sending only owned rows: every rank knows the whole routing, so it knows how many rows each rank
owns. Where it sends fewer bytes, each rank sends just its computed rows, padded with zeros to the
busiest rank's count, through ``all_gather`` (a copy: exact), and every rank places the gathered
rows by index. Bytes each rank sends under the ring backend: ``all_sum`` of ``M`` rows is a
reduce-scatter then an all-gather, ``2 (n - 1) / n * M`` rows; ``all_gather`` of ``C`` padded rows
forwards every rank's block once, ``(n - 1) * C`` rows. So the gather is used where
``C < 2 M / n``: a 4k-token prefill pass (``M`` = 40,960 rows, 320 MiB in bf16 at hidden 4096)
sends about half, and a decode step of K = 10 rows too whenever the busiest rank owns fewer than
``2 K / n`` of them (measured with ``bench-ranks``: BENCHMARKS.md). ``all_sum`` stays where it
sends no more (one rank owning every row, or ``n`` >= 4 with a busy rank).

A rank that dies or hangs must not hang the others: every collective the engine waits on runs
under a watchdog that ends the process with a named error after ``timeout_s``.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
import numpy as np

from engine.errors import ModelError, MoeBarError, UnsupportedModelError
from engine.storage.rank_folder import RANK_MANIFEST, model_identity, read_rank_share

if TYPE_CHECKING:
    from engine.model.streamed_moe import StreamedSwitch

COLLECTIVE_TIMEOUT_S = 120.0  # a healthy collective takes milliseconds; a dead peer never answers
EXIT_PEER_LOST = 75  # exit status of a rank whose collective timed out


class DistributedSetupError(ModelError):
    """The hostfile or the ranks' setup is wrong (names the host or the field)."""

    code = "distributed_setup"


def hosts_from_file(path: str | Path) -> list[str]:
    """The ``host:port`` of each rank from an mlx.distributed ring hostfile (JSON list per rank)."""
    p = Path(path)
    try:
        data = json.loads(p.read_text("utf-8"))
    except OSError as e:
        raise DistributedSetupError(f"{p}: cannot read the hostfile ({e.strerror or e})") from None
    except json.JSONDecodeError as e:
        raise DistributedSetupError(f"{p}: not JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, list) or len(data) < 1:
        raise DistributedSetupError(f"{p}: expected a JSON list with one entry per rank, got {type(data).__name__}")
    hosts: list[str] = []
    for i, entry in enumerate(data):
        addrs = entry if isinstance(entry, list) else [entry]
        if not addrs or not all(isinstance(a, str) for a in addrs):
            raise DistributedSetupError(f"{p}: rank {i}: expected a list of \"host:port\" strings, got {entry!r}")
        for a in addrs:
            host, sep, port = a.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise DistributedSetupError(f"{p}: rank {i}: {a!r} is not host:port")
        hosts.append(addrs[0])
    return hosts


class PeerLostError(MoeBarError):
    """A collective failed: another rank died or the link to it broke (names the rank and the step)."""

    code = "peer_lost"
    usable = False  # the ranks' group is broken: the engine must be restarted with every rank


class _Watchdog:
    """Ends the process if an armed wait is not over within its timeout.

    A Python timer gives the named message; MLX calls that keep the GIL while they block (the
    ring backend's connect) would stop that timer, so faulthandler's C-level timer, armed a few
    seconds later, ends the process regardless (printing where it hung).
    """

    BACKSTOP_S = 3.0

    def __init__(self, timeout_s: float, describe: Callable[[], str]) -> None:
        self.timeout_s = timeout_s
        self._describe = describe
        self._timer: threading.Timer | None = None

    def __enter__(self) -> "_Watchdog":
        self._timer = threading.Timer(self.timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()
        faulthandler.dump_traceback_later(self.timeout_s + self.BACKSTOP_S, exit=True)
        return self

    def __exit__(self, *exc: object) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        sys.stderr.write(f"error: {self._describe()}: no answer within {self.timeout_s:.0f} s; a peer rank died "
                         "or cannot be reached. Stopping this rank.\n")
        sys.stderr.flush()
        os._exit(EXIT_PEER_LOST)


_JOINED: list["ExpertParallel"] = []  # this process's group, once joined


@dataclass(frozen=True)
class CombinePlan:
    """How one layer's per-slot outputs are combined across ``size`` ranks, and the bytes each rank sends."""

    size: int
    counts: tuple[int, ...]  # (token, choice) rows each rank owns
    row_bytes: int  # bytes of one row (hidden size x activation itemsize)

    @property
    def rows(self) -> int:
        """Every (token, choice) row of the layer."""
        return sum(self.counts)

    @property
    def padded_rows(self) -> int:
        """Rows each rank sends through ``all_gather``: the busiest rank's count."""
        return max(self.counts)

    @property
    def all_sum_bytes(self) -> int:
        """Bytes each rank sends for an ``all_sum`` of every row (ring: reduce-scatter + all-gather)."""
        return 2 * (self.size - 1) * self.rows * self.row_bytes // self.size

    @property
    def gather_bytes(self) -> int:
        """Bytes each rank sends for an ``all_gather`` of the padded owned rows (ring: n - 1 forwards)."""
        return (self.size - 1) * self.padded_rows * self.row_bytes

    @property
    def gathered(self) -> bool:
        """Whether the owned-rows gather sends fewer bytes than the ``all_sum`` (ties keep ``all_sum``)."""
        return self.gather_bytes < self.all_sum_bytes

    @property
    def bytes_sent(self) -> int:
        """Bytes each rank sends with the chosen collective."""
        return self.gather_bytes if self.gathered else self.all_sum_bytes


def combine_plan(experts: np.ndarray, size: int, row_bytes: int) -> CombinePlan:
    """The plan for rows routed to ``experts`` (any shape) on ``size`` ranks; every rank computes the same."""
    owners = np.asarray(experts).reshape(-1) % size
    counts = np.bincount(owners, minlength=size)
    return CombinePlan(size, tuple(int(c) for c in counts), row_bytes)


def gathered_positions(experts: np.ndarray, size: int, padded_rows: int) -> np.ndarray:
    """Where each (token, choice) row lies in the gathered ``[size * padded_rows, hidden]`` array.

    Rank ``r``'s block starts at ``r * padded_rows`` and holds its owned rows in row order.
    """
    owners = np.asarray(experts).reshape(-1) % size
    order = np.argsort(owners, kind="stable")  # rows grouped by owner, in row order within each
    counts = np.bincount(owners, minlength=size)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    within = np.empty(owners.size, dtype=np.int64)
    within[order] = np.arange(owners.size) - starts[owners[order]]
    return (owners * padded_rows + within).astype(np.int32)


@dataclass
class ExpertParallel:
    """This process's share of the experts and the group it combines results with."""

    group: Any  # mx.distributed.Group
    rank: int
    size: int
    timeout_s: float = COLLECTIVE_TIMEOUT_S
    collectives: int = field(default=0)  # collectives made, since load
    bytes_sent: int = field(default=0)  # bytes this rank sent combining expert layers (ring accounting)
    gathered_layers: int = field(default=0)  # expert layers combined by the owned-rows all_gather
    summed_layers: int = field(default=0)  # expert layers combined by the all_sum of every row
    combine: str = "auto"  # "auto" (fewer bytes), or "all_sum" / "gather" forced (bench-ranks compares them)

    @staticmethod
    def ranks_in_environment() -> int:
        """How many ranks this process was started as one of (1 alone), from the environment only.

        Read before joining (the memory budget sizes the cache to this rank's share of the
        experts); an unreadable JACCL device file counts as 1 here and is reported when joining.
        """
        if _JOINED:
            return _JOINED[0].size
        if os.environ.get("MLX_RANK") is None and os.environ.get("JACCL_RANK") is None:
            return 1
        if os.environ.get("MLX_HOSTFILE"):
            return max(1, len(hosts_from_file(os.environ["MLX_HOSTFILE"])))
        devices = os.environ.get("JACCL_IBV_DEVICES") or os.environ.get("MLX_IBV_DEVICES")
        try:
            matrix = json.loads(Path(devices).read_text("utf-8")) if devices else None
        except (OSError, ValueError):
            return 1
        return len(matrix) if isinstance(matrix, list) and matrix else 1

    @classmethod
    def from_environment(cls, timeout_s: float = COLLECTIVE_TIMEOUT_S) -> "ExpertParallel | None":
        """The group of this process when it was started as one of several ranks, else None.

        Started by ``mlx.launch`` or with ``MLX_RANK`` + ``MLX_HOSTFILE`` (ring backend over TCP,
        e.g. a Thunderbolt bridge) or + ``MLX_IBV_DEVICES`` (JACCL: RDMA over Thunderbolt 5, with
        the variables ``mlx.launch --backend jaccl`` sets); ``MOEBAR_DISTRIBUTED_BACKEND`` names
        a backend explicitly.
        """
        if _JOINED:  # the process joins its ranks once; later engines share the group
            return _JOINED[0]
        rdma_devices = os.environ.get("JACCL_IBV_DEVICES") or os.environ.get("MLX_IBV_DEVICES")
        hostfile = os.environ.get("MLX_HOSTFILE") or rdma_devices
        if (os.environ.get("MLX_RANK") is None and os.environ.get("JACCL_RANK") is None) or not hostfile:
            return None
        hosts: list[str] = []
        if os.environ.get("MLX_HOSTFILE"):
            hosts = hosts_from_file(os.environ["MLX_HOSTFILE"])
            if len(hosts) < 2:
                return None
        backend = os.environ.get("MOEBAR_DISTRIBUTED_BACKEND") or ("ring" if os.environ.get("MLX_HOSTFILE") else "jaccl")
        timeout_s = float(os.environ.get("MOEBAR_COLLECTIVE_TIMEOUT_S", timeout_s))
        peers = ", ".join(hosts) if os.environ.get("MLX_HOSTFILE") else hostfile
        rank = os.environ.get("MLX_RANK")
        what = f"rank {rank}: connecting to the other ranks ({peers})"
        # said before the wait: if the connect blocks with the GIL held, only the C-level backstop can end it
        sys.stderr.write(f"{what}; giving up after {timeout_s:.0f} s if a peer rank died or cannot be reached\n")
        sys.stderr.flush()
        try:
            with _Watchdog(timeout_s, lambda: what):
                group = mx.distributed.init(strict=True, backend=backend)
        except RuntimeError as e:
            raise DistributedSetupError(f"mlx.distributed ({backend}) could not connect the ranks ({peers}): {e}") from None
        if group.size() < 2:
            return None
        _JOINED.append(cls(group=group, rank=group.rank(), size=group.size(), timeout_s=timeout_s))
        return _JOINED[0]

    def owns(self, experts: np.ndarray) -> np.ndarray:
        """Which of ``experts`` (ids) this rank reads and computes."""
        return (np.asarray(experts) % self.size) == self.rank

    def all_sum(self, x: mx.array, what: str, *, watched: bool = True) -> mx.array:
        """Sum ``x`` over the ranks and wait for it, under the collective watchdog unless not ``watched``."""
        return self._wait(mx.distributed.all_sum(x, group=self.group), what, watched)

    def all_gather(self, x: mx.array, what: str) -> mx.array:
        """Every rank's ``x`` concatenated along axis 0, in rank order, under the collective watchdog."""
        return self._wait(mx.distributed.all_gather(x, group=self.group), what, True)

    def _wait(self, y: mx.array, what: str, watched: bool) -> mx.array:
        """Evaluate the collective ``y``; a timeout ends the process, a lost peer is a PeerLostError."""
        self.collectives += 1
        try:
            if not watched:  # (a follower waiting for rank 0's next request may wait for hours)
                mx.eval(y)
                return y
            with _Watchdog(self.timeout_s, lambda: f"rank {self.rank}/{self.size}: {what}"):
                mx.eval(y)
        except RuntimeError as e:  # the ring backend: "connection to a peer was lost"
            raise PeerLostError(f"rank {self.rank} of {self.size}: {what}: {e}; another rank stopped") from None
        return y

    def run_layer(self, switch: "StreamedSwitch", x: mx.array, host_idx: np.ndarray) -> mx.array:
        """The switch output ``[..., K, hidden]``: this rank's pairs computed, the others' gathered or summed in."""
        k = host_idx.shape[-1]
        d = x.shape[-1]
        flat = host_idx.reshape(-1)
        owned = np.nonzero(self.owns(flat))[0]
        plan = combine_plan(flat, self.size, d * x.dtype.size)
        y: mx.array | None = None
        if owned.size:
            rows = x.reshape(-1, d)[mx.array(owned // k)]
            y = switch.run_pairs(rows, flat[owned], call_pairs=int(flat.size))  # padded to the whole call's kernel
            if y.dtype != x.dtype:
                raise UnsupportedModelError(
                    f"expert layer {switch.layer}: its experts return {y.dtype} for {x.dtype} activations; "
                    "expert parallelism combines outputs in the activation dtype and cannot do so exactly"
                )
        what = f"expert layer {switch.layer}"
        gather = plan.gathered if self.combine == "auto" else self.combine == "gather"
        self.bytes_sent += plan.gather_bytes if gather else plan.all_sum_bytes
        if gather:  # only the owned rows travel, padded to the busiest rank's count
            self.gathered_layers += 1
            if not flat.size:  # no rows on any rank (each sees the same routing): nothing to gather
                return mx.zeros((*host_idx.shape, d), dtype=x.dtype)
            pad = plan.padded_rows - owned.size
            parts = ([y] if y is not None else []) + ([mx.zeros((pad, d), dtype=x.dtype)] if pad else [])
            mine = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)
            gathered = self.all_gather(mine, what)
            total = gathered[mx.array(gathered_positions(flat, self.size, plan.padded_rows))]
            return total.reshape(*host_idx.shape, d)
        self.summed_layers += 1
        rows_out = mx.zeros((1, d), dtype=x.dtype)  # row 0: the zero row of pairs owned elsewhere
        if y is not None:
            rows_out = mx.concatenate([rows_out, y], axis=0)
        where = np.zeros(flat.size, dtype=np.int32)
        where[owned] = np.arange(1, owned.size + 1, dtype=np.int32)
        mine = rows_out[mx.array(where)]  # a gather: exact copies and exact zeros
        total = self.all_sum(mine, what)
        return total.reshape(*host_idx.shape, d)

    def agree_token(self, token: mx.array) -> mx.array:
        """Rank 0's sampled token on every rank (one small collective per token)."""
        mine = token.astype(mx.int32) if self.rank == 0 else mx.zeros(token.shape, dtype=mx.int32)
        return self.all_sum(mine, "agreeing on the sampled token").astype(token.dtype)

    def agree_flag(self, flag: bool, what: str) -> bool:
        """Rank 0's ``flag`` on every rank (the others' own values are ignored)."""
        mine = mx.array([1 if (flag and self.rank == 0) else 0], dtype=mx.int32)
        return bool(self.all_sum(mine, what).item())

    def agreed_stop(self, stop: Callable[[], bool] | None) -> Callable[[], bool]:
        """A stop check that asks rank 0's ``stop`` and tells every rank its answer (a collective per call).

        Every rank polls at the same points of the same code, so the ranks stop at the same step.
        """
        local = stop or (lambda: False)
        return lambda: self.agree_flag(local() if self.rank == 0 else False, "agreeing on stop")

    def check_same_setup(self, fingerprints: str | dict[str, str], problem: str | None = None,
                         details: dict[str, str] | None = None) -> None:
        """Refuse ranks started on different models or options (every rank compares with rank 0's).

        ``fingerprints``: a hex digest of what must agree, or one per named part ("model",
        "options"); ``details[part]`` says, on a rank that differs, what its part is. ``problem``:
        why this rank cannot start (its folder is another rank's share), raised here once every
        rank knows. Every rank learns whether any rank differs, so none is left waiting in a
        collective the others never make.
        """
        parts = {"setup": fingerprints} if isinstance(fingerprints, str) else dict(fingerprints)
        names = list(parts)
        digest = np.concatenate([np.frombuffer(bytes.fromhex(parts[n])[:8].ljust(8, b"\0"), dtype=np.int32)
                                 for n in names])
        mine = mx.array(digest)
        ref = np.array(self.all_sum(mine if self.rank == 0 else mx.zeros_like(mine), "comparing setups"))
        differs = [not np.array_equal(ref[2 * i: 2 * i + 2], digest[2 * i: 2 * i + 2]) for i in range(len(names))]
        width = len(names) + 1  # one flag per part, then "cannot start"
        flags = np.zeros((self.size, width), dtype=np.int32)
        flags[self.rank, : len(names)] = differs
        flags[self.rank, -1] = problem is not None
        summed = np.array(self.all_sum(mx.array(flags.reshape(-1)), "comparing setups")).reshape(self.size, width)
        if problem is not None:
            raise DistributedSetupError(problem)
        stuck = [r for r in range(self.size) if summed[r, -1]]
        if stuck:
            raise DistributedSetupError(
                f"rank {', '.join(map(str, stuck))} cannot start: its model folder is another rank's share "
                "(see that rank's error); every rank stops"
            )
        bad = [r for r in range(self.size) if summed[r, :-1].any()]
        if bad:
            if any(differs):
                who = "this rank"
                what = "; ".join((details or {}).get(n, f"the {n} differs") for n, d in zip(names, differs) if d)
            else:
                who = "rank " + ", ".join(str(r) for r in bad)
                what = ", ".join(f"the {n}" for i, n in enumerate(names) if summed[:, i].any()) + " differ(s)"
            raise DistributedSetupError(
                f"{who} was started on another model or other options than rank 0: every rank needs the "
                f"same model (same files, or its share of them), experts per token and engine options ({what})"
            )


def setup_fingerprints(model_dir: Path, fields: dict[str, Any]) -> dict[str, str]:
    """Digests of what must agree across ranks: "model" (which model, a share's recorded original
    included, and its config.json) and "options" (``fields``)."""
    import hashlib

    model = hashlib.sha256(model_identity(model_dir).encode())
    config = model_dir / "config.json"
    if config.is_file():
        model.update(config.read_bytes())
    options = hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode())
    return {"model": model.hexdigest(), "options": options.hexdigest()}


def setup_fingerprint(model_dir: Path, fields: dict[str, Any]) -> str:
    """One digest of ``setup_fingerprints`` (the model and ``fields``)."""
    import hashlib

    parts = setup_fingerprints(model_dir, fields)
    return hashlib.sha256((parts["model"] + parts["options"]).encode()).hexdigest()


def attach_expert_parallel(streamer: Any, model_dir: Path, fields: dict[str, Any]) -> ExpertParallel | None:
    """Join the ranks this process was started with (None when it runs alone) and check their setup.

    The streamer then reads and runs only this rank's experts; next-layer prefetch is off (it
    would read other ranks' experts).
    """
    parallel = ExpertParallel.from_environment()
    if parallel is None:
        return None
    share = read_rank_share(model_dir)
    problem = share.problem_for(parallel.rank, parallel.size) if share is not None else None
    model = (f"its model folder {model_dir} is a share of {share.source!r} ({RANK_MANIFEST} field 'model'), "
             "not of rank 0's model" if share is not None
             else f"its model folder {model_dir} (config.json and weight files) is not rank 0's model")
    parallel.check_same_setup(setup_fingerprints(model_dir, fields), problem,
                              {"model": model, "options": f"its options differ: {json.dumps(fields, sort_keys=True)}"})
    streamer.parallel = parallel
    streamer.prefetch = False
    return parallel
