"""The GPU run's cold-compute probe (bench/gpu/cold_compute_probe.py) runs off the GPU as a smoke
test: every variant is timed and the gathered copy computes what the slots in place compute."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_cold_compute_probe_times_every_variant_and_the_copy_is_exact(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    spec = importlib.util.spec_from_file_location("cold_compute_probe", ROOT / "bench/gpu/cold_compute_probe.py")
    assert spec and spec.loader
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    monkeypatch.setattr(sys, "argv", ["probe", "--layers", "2", "--k", "3", "--hidden", "128", "--inner", "64",
                                      "--repeats", "1", "--pool-slots", "10", "--out", str(tmp_path)])  # fmt: skip
    assert probe.main() == 0
    result = json.loads((tmp_path / "cold_compute_probe.json").read_text())
    expert_bytes = sum(p.nbytes for p in probe.expert_params(128, 64, 4, 64))
    assert result["expert_mb"] == pytest.approx(expert_bytes / 1e6) and result["token_mb"] == pytest.approx(6 * expert_bytes / 1e6)
    assert result["gathered_equals_in_place"] is True
    assert result["rewrite_rounds"] == 12 and result["rewrite_mismatches"] == []
    assert result["cuda_placement"] is False and result["moved_to_device"] is False  # (the CPU: nothing placed)
    for key in ("host_write_plain_ms", "host_write_pool_ms", "host_resident_unwritten_ms", "host_resident_rewritten_ms",
                "gathered_first_unwritten_ms", "gathered_first_rewritten_ms", "device_resident_ms",
                "plain_device_ms"):  # fmt: skip
        assert result[key] > 0, key
