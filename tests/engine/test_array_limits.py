"""Which backend MLX computes on, and the sizes it allows (engine/model/array_limits.py), through a
fake ``mx``: CPU, Metal and CUDA, and MLX builds that lack a query (the CPU then, never a crash)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from engine.model import array_limits
from engine.model.array_limits import GPU_SAFE_ARRAY_BYTES, backend, max_array_bytes, recommended_working_set_bytes


def _mx(device: str = "gpu", cuda: Any = False, info: Any = None) -> SimpleNamespace:
    def fail() -> Any:
        raise RuntimeError("no device")

    fake = SimpleNamespace(gpu="gpu", default_device=(fail if device == "fail" else lambda: device))
    if cuda is not None:
        fake.cuda = SimpleNamespace(is_available=(fail if cuda == "fail" else lambda: cuda))
    if info is not None:
        fake.device_info = fail if info == "fail" else (lambda: info)
    return fake


@pytest.mark.parametrize(
    ("fake", "expected"),
    [
        (_mx("cpu"), "cpu"),
        (_mx("fail"), "cpu"),  # an MLX that cannot say: the CPU's limits, the safe side for a pool
        (_mx("gpu", cuda=True), "cuda"),
        (_mx("gpu", cuda=False), "metal"),
        (_mx("gpu", cuda=None), "metal"),  # an MLX built without the cuda module
        (_mx("gpu", cuda="fail"), "metal"),
    ],
)
def test_backend_is_read_from_mlx_and_never_fails(monkeypatch: pytest.MonkeyPatch, fake: Any, expected: str) -> None:
    monkeypatch.setattr(array_limits, "mx", fake)
    assert backend() == expected


def test_metal_limits_come_from_the_device_info(monkeypatch: pytest.MonkeyPatch) -> None:
    info = {"max_buffer_length": 1 << 30, "max_recommended_working_set_size": 96 << 30}
    monkeypatch.setattr(array_limits, "mx", _mx("gpu", cuda=False, info=info))
    assert max_array_bytes() == 1 << 30  # the device's buffer limit, below the 2 GiB measured exact
    assert recommended_working_set_bytes() == 96 << 30
    monkeypatch.setattr(array_limits, "mx", _mx("gpu", cuda=False, info="fail"))
    assert max_array_bytes() == GPU_SAFE_ARRAY_BYTES  # no device info: the measured bound alone
    assert recommended_working_set_bytes() is None
    monkeypatch.setattr(array_limits, "mx", _mx("gpu", cuda=False))  # an MLX without device_info
    assert recommended_working_set_bytes() is None


def test_working_set_only_on_metal_and_only_a_positive_size() -> None:
    assert recommended_working_set_bytes("cuda", {"max_recommended_working_set_size": 1 << 30}) is None
    assert recommended_working_set_bytes("cpu", {"max_recommended_working_set_size": 1 << 30}) is None
    assert recommended_working_set_bytes("metal", {"max_recommended_working_set_size": 0}) is None
    assert recommended_working_set_bytes("metal", {"max_recommended_working_set_size": "big"}) is None
    assert recommended_working_set_bytes("metal", {"max_recommended_working_set_size": 5 << 30}) == 5 << 30
