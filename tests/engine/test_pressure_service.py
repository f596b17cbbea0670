"""The service under memory pressure: a fake pressure source and clock drive real cache resizes,
which reach the app as a notice and in the live figures; off, nothing changes."""

from __future__ import annotations

import io
import json

from engine.platform_info import MemoryPressure
from engine.serving import protocol
from engine.serving.pressure_policy import NORMAL_HOLD_S
from engine.serving.protocol import LoadRequest, NoticeEvent
from engine.serving.service import EngineService
from engine.serving.stdio_server import StdioServer
from engine.types import EngineOptions
from exactness import cache_mb


class FakePressure:
    """A pressure source whose level the test sets, and a clock it moves."""

    def __init__(self) -> None:
        self.level = "normal"
        self.now = 0.0

    def read(self) -> MemoryPressure:
        return MemoryPressure(self.level, 0.0, "test")  # type: ignore[arg-type]

    def clock(self) -> float:
        return self.now


def _service(fake: FakePressure) -> tuple[EngineService, list[object]]:
    service = EngineService(pressure_source=fake.read, clock=fake.clock, pressure_poll_s=None)
    notices: list[object] = []
    service.notify = notices.append
    return service, notices


def test_critical_pressure_shrinks_the_cache_and_calm_grows_it_back(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path = tiny_model("qwen3_moe", 4)
    fake = FakePressure()
    service, notices = _service(fake)
    try:
        service.load(LoadRequest(model_dir=str(path), options=EngineOptions(cache_mb=cache_mb(path, "all"))), lambda e: None)
        _, before = service.live_figures()
        assert 0 < before.expert_cache_bytes == before.expert_cache_full_bytes
        assert service.poll_memory_pressure() is None and notices == []  # normal, at full size: nothing

        fake.level, fake.now = "critical", 10.0
        assert service.poll_memory_pressure() == "shrink"
        _, after = service.live_figures()
        assert after.expert_cache_bytes < before.expert_cache_bytes == after.expert_cache_full_bytes
        (notice,) = notices
        assert isinstance(notice, NoticeEvent) and notice.code == "cache_reduced" and notice.level == "warning"
        assert notice.bytes == after.expert_cache_bytes
        assert notice.message.startswith("Memory pressure (critical): expert cache reduced to ")

        fake.level = "normal"
        for t in (12.0, 100.0, 12.0 + NORMAL_HOLD_S - 1):
            fake.now = t
            assert service.poll_memory_pressure() is None
        fake.now = 12.0 + NORMAL_HOLD_S
        assert service.poll_memory_pressure() == "grow"
        _, restored = service.live_figures()
        assert restored.expert_cache_bytes == before.expert_cache_bytes
        assert notices[-1].code == "cache_restored" and "(its full size)" in notices[-1].message  # type: ignore[attr-defined]
    finally:
        service.close()


def test_with_the_option_off_pressure_changes_nothing(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path = tiny_model("qwen3_moe", 4)
    fake = FakePressure()
    service, notices = _service(fake)
    try:
        options = EngineOptions(cache_mb=cache_mb(path, "all"), shrink_cache_under_pressure=False)
        service.load(LoadRequest(model_dir=str(path), options=options), lambda e: None)
        _, before = service.live_figures()
        fake.level = "critical"
        for t in (0.0, 20.0, 40.0):
            fake.now = t
            assert service.poll_memory_pressure() is None
        _, after = service.live_figures()
        assert after.expert_cache_bytes == before.expert_cache_bytes and notices == []
    finally:
        service.close()


def test_notice_event_and_new_figures_cross_the_protocol() -> None:
    line = protocol.encode(NoticeEvent(code="cache_reduced", message="Memory pressure: expert cache reduced to 2.1 GB",
                                       level="warning", bytes=2_100_000_000))  # fmt: skip
    back = protocol.decode_event(line)
    assert isinstance(back, NoticeEvent) and back.bytes == 2_100_000_000 and back.level == "warning"
    # an engine from before these fields: its stats still decode (the new figures default to 0)
    old = json.loads(protocol.encode(protocol.StatsEvent(figures=protocol.LiveFigures())))
    del old["figures"]["expert_cache_bytes"], old["figures"]["expert_cache_full_bytes"]
    stats = protocol.decode_event(json.dumps(old))
    assert isinstance(stats, protocol.StatsEvent) and stats.figures.expert_cache_full_bytes == 0


def test_the_stdio_server_sends_idle_notices() -> None:
    service = EngineService(pressure_poll_s=None)
    out = io.StringIO()
    server = StdioServer(service, io.StringIO(), out)
    assert service.notify is server.emit
    service.notify(NoticeEvent(code="cache_reduced", message="m"))
    assert json.loads(out.getvalue())["type"] == "notice"


def test_the_load_option_crosses_the_protocol_and_is_checked() -> None:
    line = '{"v":1,"type":"load","model_dir":"/m","options":{"shrink_cache_under_pressure":false}}'
    request = protocol.decode_request(line)
    assert isinstance(request, LoadRequest) and request.options.shrink_cache_under_pressure is False
    assert protocol.decode_request('{"v":1,"type":"load","model_dir":"/m"}').options.shrink_cache_under_pressure is True  # type: ignore[union-attr]
    try:
        protocol.decode_request(line.replace("false", "3"))
    except protocol.ProtocolError as exc:
        assert exc.field == "load.options.shrink_cache_under_pressure"
    else:
        raise AssertionError("a non-boolean shrink_cache_under_pressure was accepted")


def test_critical_pressure_at_the_floor_changes_nothing_and_says_nothing(tiny_model) -> None:  # type: ignore[no-untyped-def]
    path = tiny_model("qwen3_moe", 4)
    fake = FakePressure()
    service, notices = _service(fake)
    try:
        # the zero cache is the K working slots: the floor a shrink never goes below
        service.load(LoadRequest(model_dir=str(path), options=EngineOptions(cache_mb=cache_mb(path, "zero"))), lambda e: None)
        _, before = service.live_figures()
        fake.level, fake.now = "critical", 10.0
        assert service.poll_memory_pressure() is None
        _, after = service.live_figures()
        assert after.expert_cache_bytes == before.expert_cache_bytes and notices == []
    finally:
        service.close()
