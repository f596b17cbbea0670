"""The benchmark runs end to end on a tiny model and writes sane JSON (targets are not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.diagnostics.bench import main as bench_main


def test_bench_runs_and_writes_json(tiny_model, tmp_path: Path, capsys) -> None:
    model = tmp_path / "model"
    import shutil

    shutil.copytree(tiny_model("qwen3_moe", 4), model)  # the bench packs the model it measures
    out = tmp_path / "bench.json"
    rc = bench_main(
        ["--model", str(model), "--decode-tokens", "3", "--prompt-tokens", "12", "--repeats", "1",
         "--disk-bytes", str(2**20), "--json", str(out)]
    )
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["disk"]["raw_parallel_read_bytes_per_s"] > 0
    assert len(r["disk"]["samples_bytes_per_s"]) == 2  # before the phases, and beside the one cold run
    for phase in ("cold", "cold_pieces", "cold_whole_reads", "cold_prefetch"):
        assert r[phase]["decode_tps"] > 0 and r[phase]["bytes_per_token"] > 0
    # the cold engine chose at load as cold mode does; its figures are the run of its choice
    choice = r["read_choice"]
    assert choice["measured_at_load"] and choice["whole_bytes_per_s"] > 0 and choice["pieces_bytes_per_s"] > 0
    assert r["cold"] == r["cold_whole_reads" if choice["piece_bytes"] == 0 else "cold_pieces"]
    assert r["warm"]["same_tokens"] is True
    assert len(r["warm"]["streamed_tps"]) == len(r["warm"]["mlx_lm_tps"]) == 1
    assert r["prefill"]["chunked"]["bytes_read"] < r["prefill"]["token_by_token"]["bytes_read"]
    assert r["memory"]["peak_rss"] > r["memory"]["baseline_rss"]
    planned = r["memory"]["planned_bytes"]
    assert r["memory"]["limit_bytes"] == sum(planned.values()) and planned["dense"] > 0
    assert planned["runtime"] >= r["memory"]["baseline_rss"]
    assert r["memory"]["mlx_peak_bytes"] >= r["memory"]["mlx_active_bytes"] > 0 and r["memory"]["mlx_cached_bytes"] >= 0
    assert r["eviction_method"].startswith(("posix_fadvise", "mmap + msync"))
    assert set(r["targets"]) >= {
        "warm_vs_mlx_lm", "cold_read_vs_raw_disk", "cold_decode_vs_serial_bound", "peak_rss_vs_limit",
        "chunked_vs_token_by_token_prefill", "bounds",
    }
    for name, t in r["targets"].items():
        if name != "bounds":
            assert t["value"] > 0 and isinstance(t["met"], bool)
    table = capsys.readouterr().out
    assert "the engine's plan: runtime" in table
    assert "targets (ratios from this run)" in table and "warm decode" in table and "median of 2 samples" in table
    assert "cold decode, one read per expert" in table and r["targets"]["bounds"]["cold_pieces_vs_whole_reads"] > 0
    assert "chosen at load" in table
    assert r["raw_block_bytes"] == [r["expert_bytes"]]  # a tiny expert is one piece: one block size sampled


def test_decode_rate_counts_the_tokens_after_the_first() -> None:
    from engine.diagnostics.bench import decode_rate

    assert decode_rate([10.0, 10.5, 11.0, 11.5]) == pytest.approx(2.0)  # 3 tokens in 1.5 s
    assert decode_rate([3.0]) == 0.0 and decode_rate([]) == 0.0 and decode_rate([1.0, 1.0]) == 0.0


def test_a_decode_run_is_timed_when_its_tokens_reach_the_caller() -> None:
    """As mlx-lm's side is: an engine whose own figure starts earlier is not measured by it."""
    import time
    import types

    from engine.diagnostics.bench import _decode

    class SlowToHandOver:
        def generate(self, prompt, sampling):  # type: ignore[no-untyped-def]
            stats = types.SimpleNamespace(decode_tps=1000.0, prompt_tps=1.0, prompt_s=1.0, cache_hit_rate=1.0,
                                          decode=types.SimpleNamespace(tokens=3, bytes_read=0, io_wait_s=0.0,
                                                                       compute_s=0.0, sync_s=0.0, elapsed_s=0.0),
                                          prefill=types.SimpleNamespace(bytes_read=0))
            for token in range(sampling.max_tokens):
                time.sleep(0.05)  # the step after this token is queued before the token is handed over
                yield types.SimpleNamespace(token=token, stats=stats)

    run = _decode(SlowToHandOver(), [1, 2], 4)
    assert run["engine_decode_tps"] == 1000.0
    assert 10.0 < run["decode_tps"] < 21.0  # 3 tokens after the first, about 0.05 s apart


def test_cold_bound_uses_the_compute_of_a_step_with_host_syncs() -> None:
    from engine.diagnostics.bench_report import targets

    step = {"decode_tps": 1.0, "bytes_per_token": 1e8, "read_bytes_per_s": 1e9}
    r = {
        "disk": {"raw_parallel_read_bytes_per_s": 1e9},  # 0.1 s of disk per token
        "cold": step,
        "warm": {"compute_per_token_s": 0.3, "ratio": 1.0},  # routed on the device: no syncs
        "warm_host_sync": {"compute_per_token_s": 0.35, "sync_per_token_s": 0.05},
        "prefill": {"chunked": {"prompt_tps": 10.0}, "token_by_token": {"prompt_tps": 1.0}},
        "memory": {"peak_rss": 1, "limit_bytes": 2},
    }
    t = targets(r)
    assert t["bounds"]["compute_s_per_token"] == pytest.approx(0.4)
    assert t["cold_decode_vs_serial_bound"]["value"] == pytest.approx(0.5)  # 1 tok/s against 1/(0.1 + 0.4)
    assert t["bounds"]["cold_decode_vs_serial_bound_device_routed"] == pytest.approx(0.4)


def test_bench_builds_its_preset_model_once_and_reuses_it(tmp_path) -> None:
    import json

    from engine.demo.demo_model import is_random_weight_model
    from engine.diagnostics.bench import _model_dir, build_parser
    from engine.model.loader import inspect_experts

    args = build_parser().parse_args(["--preset", "tiny", "--layers", "2", "--experts", "8", "--work-dir", str(tmp_path)])
    path = _model_dir(args)
    assert path == tmp_path / "tiny-L2-E8" and is_random_weight_model(path)
    layers = inspect_experts(path).layers
    assert len(layers) == 2 and layers[0].num_experts == 8
    stamp = (path / "config.json").stat().st_mtime_ns
    assert _model_dir(args) == path and (path / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert json.loads((path / "config.json").read_text())["model_type"] == "qwen3_moe"
    given = build_parser().parse_args(["--model", str(path)])
    assert _model_dir(given) == path.resolve()
