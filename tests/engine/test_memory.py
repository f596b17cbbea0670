"""Peak RSS stays under dense + cache budget + a stated overhead when experts far exceed the budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# What a fresh process may add beyond its baseline (interpreter, MLX, the tokenizer), the dense
# weights and the expert cache: KV cache, MLX allocator slack, I/O buffers, activations.
OVERHEAD_BYTES = 128 * 2**20
CACHE_MB = 16


@pytest.fixture(scope="module")
def large_expert_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.demo.demo_model import build_random_moe_model

    out = tmp_path_factory.mktemp("mem") / "model"
    return build_random_moe_model(out, "qwen3_moe", 4, preset="small", config_overrides={"num_experts": 64})


def test_peak_rss_is_dense_plus_budget_plus_overhead(large_expert_model: Path) -> None:
    probe = Path(__file__).with_name("rss_probe.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run(
        [sys.executable, str(probe), str(large_expert_model), str(CACHE_MB), "8"],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["expert_bytes_total"] >= 8 * CACHE_MB * 2**20
    assert r["expert_bytes_total"] > 3 * OVERHEAD_BYTES  # loading the experts would break the bound
    assert r["bytes_read"] > r["cache_bytes"]  # it really streamed
    limit = r["baseline_rss"] + r["dense_bytes"] + r["cache_bytes"] + OVERHEAD_BYTES
    assert r["peak_rss"] <= limit, (
        f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB > baseline {r['baseline_rss'] / 2**20:.0f} + dense "
        f"{r['dense_bytes'] / 2**20:.0f} + cache {r['cache_bytes'] / 2**20:.0f} + overhead 128 MiB"
    )
