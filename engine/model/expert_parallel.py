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


@dataclass
class ExpertParallel:
    """This process's share of the experts and the group it combines results with."""

    group: Any  # mx.distributed.Group
    rank: int
    size: int
    timeout_s: float = COLLECTIVE_TIMEOUT_S
    collectives: int = field(default=0)  # all_sum calls made, since load

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
        self.collectives += 1
        y = mx.distributed.all_sum(x, group=self.group)
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
        """The switch output ``[..., K, hidden]``: this rank's pairs computed, the rest summed in."""
        k = host_idx.shape[-1]
        d = x.shape[-1]
        flat = host_idx.reshape(-1)
        owned = np.nonzero(self.owns(flat))[0]
        rows_out = mx.zeros((1, d), dtype=x.dtype)  # row 0: the zero row of pairs owned elsewhere
        if owned.size:
            ids = flat[owned]
            rows = x.reshape(-1, d)[mx.array(owned // k)]
            y = switch.run_pairs(rows, ids)
            if y.dtype != x.dtype:
                raise UnsupportedModelError(
                    f"expert layer {switch.layer}: its experts return {y.dtype} for {x.dtype} activations; "
                    "expert parallelism combines outputs in the activation dtype and cannot do so exactly"
                )
            rows_out = mx.concatenate([rows_out, y], axis=0)
        where = np.zeros(flat.size, dtype=np.int32)
        where[owned] = np.arange(1, owned.size + 1, dtype=np.int32)
        mine = rows_out[mx.array(where)]  # a gather: exact copies and exact zeros
        total = self.all_sum(mine, f"expert layer {switch.layer}")
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

    def check_same_setup(self, fingerprint: str) -> None:
        """Refuse ranks started on different models or options (every rank compares with rank 0's).

        ``fingerprint`` is a hex digest of what must agree; every rank learns whether any rank
        differs, so none is left waiting in a collective the others never make.
        """
        digest = np.frombuffer(bytes.fromhex(fingerprint)[:8].ljust(8, b"\0"), dtype=np.int32).copy()
        mine = mx.array(digest)
        ref = self.all_sum(mine if self.rank == 0 else mx.zeros_like(mine), "comparing setups")
        differs = not bool(mx.all(ref == mine).item())
        flags = mx.zeros((self.size,), dtype=mx.int32)
        if differs:
            flags = mx.array([1 if r == self.rank else 0 for r in range(self.size)], dtype=mx.int32)
        summed = np.array(self.all_sum(flags, "comparing setups"))
        bad = [r for r in range(self.size) if summed[r]]
        if bad:
            who = "this rank" if differs else "rank " + ", ".join(str(r) for r in bad)
            raise DistributedSetupError(
                f"{who} was started on another model or other options than rank 0: every rank needs the "
                "same model (same files), experts per token and engine options"
            )


def setup_fingerprint(model_dir: Path, fields: dict[str, Any]) -> str:
    """A digest of what must agree across ranks: the model's files (names and sizes), its config, ``fields``."""
    import hashlib

    h = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        h.update(config.read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size};".encode())
    h.update(json.dumps(fields, sort_keys=True, default=str).encode())
    return h.hexdigest()


def attach_expert_parallel(streamer: Any, model_dir: Path, fields: dict[str, Any]) -> ExpertParallel | None:
    """Join the ranks this process was started with (None when it runs alone) and check their setup.

    The streamer then reads and runs only this rank's experts; next-layer prefetch is off (it
    would read other ranks' experts).
    """
    parallel = ExpertParallel.from_environment()
    if parallel is None:
        return None
    parallel.check_same_setup(setup_fingerprint(model_dir, fields))
    streamer.parallel = parallel
    streamer.prefetch = False
    return parallel
