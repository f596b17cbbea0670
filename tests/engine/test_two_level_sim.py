"""The two-level cache simulation behind the page-cache reserve: what each level serves."""

from __future__ import annotations

import numpy as np
import pytest

from engine.diagnostics.two_level_sim import format_table, simulate, sweep


def _ids(rows: list[list[list[int]]]) -> np.ndarray:
    return np.array(rows, dtype=np.int32)


def test_levels_count_every_lookup_once() -> None:
    rng = np.random.default_rng(0)
    ids = np.stack([np.stack([rng.choice(16, 2, replace=False) for _ in range(3)]) for _ in range(200)])
    for share in (0.0, 0.5, 1.0):
        r = simulate(ids, capacity_experts=12, share=share, warmup_tokens=50)
        beyond = r["page_cache_per_token"] + r["disk_per_token"]  # lookups the process cache missed
        assert beyond == pytest.approx(6 * (1 - r["in_process_hit_rate"]))  # 3 layers x 2
    nothing = simulate(ids, 12, 0.0, 50)
    assert nothing["in_process_hit_rate"] == 0.0 and nothing["page_cache_experts"] == 12
    everything = simulate(ids, 12, 1.0, 50)
    assert everything["in_process_experts_per_layer"] == 4 and everything["page_cache_experts"] == 0
    assert everything["page_cache_per_token"] == 0.0


def test_a_page_cache_smaller_than_the_process_cache_duplicates_it() -> None:
    # one layer cycling over 3 experts: an in-process cache of 3 holds them all; a page cache of 1
    # behind it only ever holds the latest miss, which the process cache holds too
    ids = _ids([[[t % 3]] for t in range(30)])
    r = simulate(ids, capacity_experts=4, share=0.75, warmup_tokens=3)
    assert r["in_process_experts_per_layer"] == 3 and r["page_cache_experts"] == 1
    assert r["in_process_hit_rate"] == 1.0 and r["page_cache_per_token"] == 0.0 and r["disk_per_token"] == 0.0
    # all four slots to the page cache: every lookup a page-cache hit (a copy), none from the disk
    r0 = simulate(ids, capacity_experts=4, share=0.0, warmup_tokens=3)
    assert r0["page_cache_per_token"] == 1.0 and r0["disk_per_token"] == 0.0


def test_sweep_on_calibrated_routing() -> None:
    r = sweep(spare_bytes=60 * 7_077_888 * 4, shares=[0.0, 1.0], tokens=20, warmup_tokens=10)
    assert r["capacity_experts"] == 240 and r["lookups_per_token"] == 600
    zero, one = r["rows"]
    assert zero["in_process_hit_rate"] == 0.0 and one["page_cache_per_token"] == 0.0
    assert set(r["best_share_by_copy_rate"]) == {"10", "20", "40"}
    assert "two-level sim" in format_table(r)
