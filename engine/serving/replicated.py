"""Serving from several machines: rank 0 runs the front-end, the other ranks replay its engine calls.

Rank 0 (the stdio loop the app runs, or ``serve``) uses a ``ReplicatedService``: before each load,
chat turn and unload it sends the protocol request to the other ranks over the ranks' own group
(mlx.distributed, as two ``all_sum``s: the length, then the bytes, zeros from everyone else).
Each other rank runs ``follow()``: the same EngineService code on the same requests, with its
events dropped, so its prompt cache, its KV state and every collective of the expert layers
happen in the same order as rank 0's. Stop is agreed per check (Engine.generate), so a cancelled
turn ends at the same step everywhere. Before a load every rank checks it has the same model
files, so a missing or different model is refused by name before any rank waits on another.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import mlx.core as mx
import numpy as np

from engine.errors import MoeBarError
from engine.model.expert_parallel import ExpertParallel, PeerLostError, setup_fingerprint
from engine.serving.protocol import (
    ChatRequest,
    DoneEvent,
    LoadedEvent,
    LoadRequest,
    Request,
    ShutdownRequest,
    UnloadRequest,
    decode_request,
    encode,
)
from engine.serving.service import Emit, EngineService

log = logging.getLogger(__name__)


class RequestChannel:
    """Protocol requests from rank 0 to every other rank, over the ranks' group."""

    def __init__(self, parallel: ExpertParallel) -> None:
        self.parallel = parallel

    def send(self, request: Request) -> None:
        """Rank 0: hand ``request`` to every other rank."""
        data = np.frombuffer(encode(request).encode("utf-8"), dtype=np.uint8)
        self.parallel.all_sum(mx.array([data.size], dtype=mx.int32), "sending a request")
        self.parallel.all_sum(mx.array(data), "sending a request")

    def receive(self) -> Request:
        """Another rank: wait (without a time limit) for rank 0's next request."""
        head = self.parallel.all_sum(mx.zeros((1,), dtype=mx.int32), "waiting for rank 0", watched=False)
        size = int(np.array(head)[0])
        data = self.parallel.all_sum(mx.zeros((size,), dtype=mx.uint8), "receiving a request")
        return decode_request(bytes(np.array(data)))


def _check_same_model(parallel: ExpertParallel, model_dir: str) -> None:
    """Every rank has the model at ``model_dir`` with the same files (refused by name otherwise)."""
    from pathlib import Path

    path = Path(model_dir).expanduser()
    fingerprint = setup_fingerprint(path, {}) if path.is_dir() else "00" * 32
    parallel.check_same_setup(fingerprint)


class ReplicatedService(EngineService):
    """Rank 0's service: every engine call is first sent to the other ranks."""

    def __init__(self, parallel: ExpertParallel, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.parallel = parallel
        self.channel = RequestChannel(parallel)

    def _load(self, req: LoadRequest, emit: Emit) -> LoadedEvent:
        self.channel.send(req)
        _check_same_model(self.parallel, req.model_dir)
        return super()._load(req, emit)

    def _chat(self, req: ChatRequest, emit: Emit, cancelled: Callable[[], bool]) -> DoneEvent:
        self.channel.send(req)
        return super()._chat(req, emit, cancelled)

    def unload(self) -> None:
        """Free the model here and on every other rank."""
        self._run(self._unload_everywhere)

    def _unload_everywhere(self) -> None:
        self.channel.send(UnloadRequest())
        self._unload_now()  # (a load unloads too, on every rank by itself: not sent)

    def close(self) -> None:
        """Unload, then let the other ranks end their follow loops."""
        if not self._closed:
            super().close()
            self._thread.submit(self.channel.send, ShutdownRequest()).result()


def follow(parallel: ExpertParallel, service: EngineService | None = None) -> int:
    """Another rank: replay rank 0's requests until it shuts down; return the exit status."""
    service = service or EngineService()
    channel = RequestChannel(parallel)

    def drop(event: Any) -> None:
        pass

    log.info("rank %d of %d: following rank 0", parallel.rank, parallel.size)
    while True:
        request = service._thread.submit(channel.receive).result()
        try:
            if isinstance(request, ShutdownRequest):
                service.close()
                return 0
            if isinstance(request, LoadRequest):
                service._run(_check_same_model, parallel, request.model_dir)
                service.load(request, drop)
            elif isinstance(request, ChatRequest):
                service.chat(request, drop, lambda: False)  # stop is rank 0's (agreed in Engine.generate)
            elif isinstance(request, UnloadRequest):
                service.unload()
        except PeerLostError:
            raise
        except MoeBarError as e:  # rank 0 met the same error at the same point: carry on
            log.info("rank %d: %s: %s", parallel.rank, type(request).__name__, e)


def service_for_this_rank() -> tuple[EngineService, Callable[[], int] | None]:
    """The service of a front-end, and for a rank other than 0 the loop to run instead of serving.

    One process alone: a plain EngineService. Rank 0 of several: a ReplicatedService. Any other
    rank: (its service, a callable that follows rank 0 until it shuts down).
    """
    from engine.serving.service import ENGINE_THREAD

    parallel = ENGINE_THREAD.submit(ExpertParallel.from_environment).result()
    if parallel is None:
        return EngineService(), None
    if parallel.rank == 0:
        return ReplicatedService(parallel), None
    service = EngineService()
    return service, lambda: follow(parallel, service)
