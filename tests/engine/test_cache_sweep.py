"""``moebar-engine bench --cache-sweep``: decode at several expert-cache sizes, page cache warm and
cold, with hit rates and MLX's memory figures (the data the page-cache reserve is chosen from)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.diagnostics.bench import main as bench_main
from engine.diagnostics.cache_sweep import parse_fractions


def test_sweep_runs_and_hit_rate_grows_with_the_cache(tiny_model, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4), model)
    out = tmp_path / "sweep.json"
    rc = bench_main(["--model", str(model), "--cache-sweep", "0,1", "--decode-tokens", "4", "--repeats", "2",
                     "--device", "cpu", "--json", str(out)])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    none, everything = r["rows"]
    assert none["cold"]["hit_rate"] == 0.0 and none["cold"]["bytes_per_token"] > 0
    assert everything["cold"]["hit_rate"] > 0.5 and everything["cold"]["bytes_per_token"] < none["cold"]["bytes_per_token"]
    for row in r["rows"]:
        for mode in ("warm_page_cache", "cold"):
            assert row[mode]["decode_tps"] > 0
            assert row[mode]["mlx_peak_bytes"] >= row[mode]["mlx_active_bytes"] > 0
    assert r["eviction_method"]
    table = capsys.readouterr().out
    assert "cache sweep:" in table and "hit rate" in table and "MLX cached" in table


def test_fractions_are_checked() -> None:
    import argparse

    assert parse_fractions("0, 0.5,1") == [0.0, 0.5, 1.0]
    for bad in ("", "x", "1.5", "-0.1"):
        with pytest.raises(argparse.ArgumentTypeError, match="cache-sweep"):
            parse_fractions(bad)
