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


def _probe(model: Path, *args: str) -> dict:
    probe = Path(__file__).with_name("rss_probe.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, str(probe), str(model), *args], capture_output=True, text=True,
                          timeout=600, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The footprint this model needs before any cache, at the default 8192-token context, is about
# 0.87 GiB here (runtime ~0.3, dense 0.2, KV 0.13, prefill, margin); the limit leaves the
# automatic cache about a third of the experts.
LIMIT_MB = 1024


def test_automatic_cache_under_a_memory_limit_keeps_peak_rss_below_it(large_expert_model: Path) -> None:
    """Issue 12's "done when": experts larger than what the limit leaves them, generation with the
    automatic cache keeps peak RSS under --memory-limit-mb and hits its cache."""
    r = _probe(large_expert_model, "auto", "16", str(LIMIT_MB))
    limit = LIMIT_MB * 2**20
    assert r["cache_mode"] == "limit"  # the limit, not the RAM, sized the cache
    assert 0 < r["plan_cache_bytes"] < r["expert_bytes_total"] // 2  # the experts do not fit under it
    assert r["footprint_bytes"] <= limit
    assert r["bytes_read"] > r["plan_cache_bytes"]  # it streamed
    assert r["cache_hits"] > 0 and r["cache_misses"] > 0, r
    assert r["peak_rss"] <= limit, f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB > limit {LIMIT_MB} MiB"
    assert r["mlx_peak_bytes"] <= limit


@pytest.mark.slow
def test_experts_far_larger_than_the_limit(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The same with experts over twice the whole limit (a 2.3 GB model; slow to build)."""
    from engine.demo.demo_model import build_random_moe_model

    out = tmp_path_factory.mktemp("mem-far") / "model"
    model = build_random_moe_model(out, "qwen3_moe", 4, preset="small", config_overrides={"num_experts": 320})
    r = _probe(model, "auto", "16", str(LIMIT_MB))
    assert r["expert_bytes_total"] > 2 * LIMIT_MB * 2**20
    assert r["cache_hits"] > 0
    assert r["peak_rss"] <= LIMIT_MB * 2**20
