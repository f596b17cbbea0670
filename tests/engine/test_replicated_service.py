"""Serving from several ranks, without a second process: a fake group of ranks whose ``all_sum``
hands rank 0's bytes to the follower (the real ring runs in test_expert_parallel.py).

Rank 0 sends every load, chat and unload before running it, and a shutdown when it closes; a
follower replays them in order, carries on past the errors rank 0 meets too (a missing model, a
chat before any load), stops at a lost peer, and each front-end picks its role from the group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from scripted_engine import ScriptedEngine, load_tokenizer, scripted_loader

from engine.model.expert_parallel import ExpertParallel, PeerLostError
from engine.serving.protocol import (
    ChatMessage,
    ChatRequest,
    LoadRequest,
    Request,
    ShutdownRequest,
    UnloadRequest,
    decode_request,
    encode,
)
from engine.serving.replicated import ReplicatedService, RequestChannel, follow, service_for_this_rank
from engine.serving.service import EngineService


class LeaderGroup:
    """Rank 0's view of a group of two: what it sends is recorded (as the follower would get it)."""

    rank, size = 0, 2

    def __init__(self) -> None:
        self.sent: list[Request] = []
        self.setups: list[str] = []
        self._size: int | None = None

    def all_sum(self, x: mx.array, what: str, *, watched: bool = True) -> mx.array:
        data = np.array(x)
        if self._size is None:
            self._size = int(data[0])
        else:
            assert data.size == self._size
            self.sent.append(decode_request(data.astype(np.uint8).tobytes()))
            self._size = None
        return x

    def check_same_setup(self, fingerprint: str) -> None:
        self.setups.append(fingerprint)


class FollowerGroup:
    """A follower's view: each request rank 0 sends arrives through two ``all_sum``s (length, bytes)."""

    rank, size = 1, 2

    def __init__(self, requests: list[Request | BaseException]) -> None:
        self.pending = list(requests)
        self.setups: list[str] = []
        self.unwatched_waits = 0
        self._data: bytes | None = None

    def all_sum(self, x: mx.array, what: str, *, watched: bool = True) -> mx.array:
        if self._data is None:
            assert x.shape == (1,) and not watched  # waiting for rank 0 has no time limit
            self.unwatched_waits += 1
            item = self.pending.pop(0)
            if isinstance(item, BaseException):
                raise item
            self._data = encode(item).encode("utf-8")
            return mx.array([len(self._data)], dtype=mx.int32)
        data, self._data = self._data, None
        assert x.shape == (len(data),)
        return mx.array(np.frombuffer(data, dtype=np.uint8))

    def check_same_setup(self, fingerprint: str) -> None:
        self.setups.append(fingerprint)


def _chat(rid: str) -> ChatRequest:
    return ChatRequest(id=rid, messages=[ChatMessage(role="user", content="hi")], thinking=False)


def test_the_channel_carries_a_request_byte_for_byte() -> None:
    leader = LeaderGroup()
    request = _chat("r1")
    RequestChannel(leader).send(request)  # type: ignore[arg-type]
    assert leader.sent == [request]
    assert RequestChannel(FollowerGroup([request])).receive() == request  # type: ignore[arg-type]


def test_rank_0_sends_each_call_before_running_it_and_shutdown_when_it_closes(tmp_path: Path) -> None:
    group = LeaderGroup()
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["hello"])
    service = ReplicatedService(group, loader=scripted_loader(engine))  # type: ignore[arg-type]
    load = LoadRequest(model_dir=str(tmp_path / "absent"))
    service.load(load, lambda ev: None)
    assert group.sent == [load] and group.setups == ["00" * 32]  # a folder this rank lacks: the null fingerprint
    done = service.chat(_chat("c1"), lambda ev: None, lambda: False)
    assert done.finish_reason == "stop"
    service.unload()
    service.close()
    service.close()  # once only
    assert [type(r).__name__ for r in group.sent] == ["LoadRequest", "ChatRequest", "UnloadRequest", "UnloadRequest",
                                                      "ShutdownRequest"]  # fmt: skip


def test_a_follower_replays_rank_0_and_carries_on_past_the_errors_rank_0_meets_too(
    tmp_path: Path, tiny_model: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.INFO, "engine.serving.replicated")
    engine = ScriptedEngine(load_tokenizer("qwen3"), ["first", "second"])
    loaded: list[str] = []

    def loader(model_dir: str, options: Any, progress: Any = None) -> ScriptedEngine:
        if not Path(model_dir).is_dir():
            from engine.errors import MissingFileError

            raise MissingFileError(f"{model_dir}: no such model folder")
        loaded.append(model_dir)
        return engine

    service = EngineService(loader=loader)
    model = tiny_model("qwen3_moe")
    requests: list[Request | BaseException] = [
        _chat("before-load"),  # rank 0 got not_loaded too
        LoadRequest(model_dir=str(tmp_path / "missing")),  # rank 0 could not load it either
        LoadRequest(model_dir=str(model)),
        _chat("c1"),
        UnloadRequest(),
        ShutdownRequest(),
    ]
    group = FollowerGroup(requests)
    assert follow(group, service) == 0  # type: ignore[arg-type]
    assert group.pending == [] and group.unwatched_waits == len(requests)
    assert loaded == [str(model)] and len(engine.prompts) == 1  # only the chat after the load ran
    assert len(group.setups) == 2 and group.setups[0] == "00" * 32 and group.setups[1] != "00" * 32
    assert "rank 1: ChatRequest: no model is loaded" in caplog.text
    assert "rank 1: LoadRequest: " in caplog.text and "no such model folder" in caplog.text
    assert engine.closed
    from engine.errors import RequestError

    with pytest.raises(RequestError, match="closed"):  # the follower's service was closed at shutdown
        service.chat(_chat("late"), lambda ev: None, lambda: False)


def test_a_follower_stops_at_a_lost_peer() -> None:
    service = EngineService(loader=scripted_loader(ScriptedEngine(load_tokenizer("qwen3"), [])))
    lost = PeerLostError("rank 1 of 2: waiting for rank 0: connection reset; another rank stopped")

    class Group(FollowerGroup):
        def check_same_setup(self, fingerprint: str) -> None:
            raise lost

    with pytest.raises(PeerLostError, match="another rank stopped"):
        follow(Group([LoadRequest(model_dir="/scripted")]), service)  # type: ignore[arg-type]
    service.close()


@pytest.mark.parametrize("rank", [None, 0, 1])
def test_each_front_end_takes_its_role_from_the_group(rank: int | None, monkeypatch: pytest.MonkeyPatch) -> None:
    group = None if rank is None else (LeaderGroup() if rank == 0 else FollowerGroup([ShutdownRequest()]))
    monkeypatch.setattr(ExpertParallel, "from_environment", classmethod(lambda cls: group))
    service, follower = service_for_this_rank()
    if rank is None:
        assert type(service) is EngineService and follower is None
    elif rank == 0:
        assert isinstance(service, ReplicatedService) and service.parallel is group and follower is None
    else:
        assert type(service) is EngineService and follower is not None
        assert follower() == 0  # it follows until rank 0 shuts down
