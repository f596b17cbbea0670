"""``bench --long-prompt``'s phase (engine/diagnostics/bench_long_prompt.py) on the tiny model.

The figures are the engine's own counters (bytes read, experts routed to); the disk rate is a fake
sampler, so the bound and the ratios are exact arithmetic here, not timings.
"""

from __future__ import annotations

from typing import Any

import pytest

from engine.diagnostics.bench_long_prompt import READ_GOAL, format_long_prompt, run_long_prompt
from engine.engine import Engine
from engine.types import EngineOptions
from exactness import all_expert_bytes, share_tokenizers


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    share_tokenizers(monkeypatch)


@pytest.mark.parametrize("compute", ["warm", "none"])
def test_long_prompt_phase_reads_each_touched_expert_once_and_reports_the_bound(tiny_model, compute: str) -> None:
    path = tiny_model("qwen3_moe", 4)
    loads: list[dict[str, Any]] = []

    def make_engine(**options: Any) -> Engine:
        loads.append(options)
        return Engine.load(path, EngineOptions(**options), measure_disk=False)

    disk = iter([1e9, 3e9, 2e9, 5e9, 4e9, 6e9])
    r = run_long_prompt(96, 32, make_engine, lambda: next(disk), all_expert_bytes(path), compute=compute, repeats=2)
    one, fixed = r["one_pass"], r["fixed_passes"]
    # cache 0, one pass: every routed expert read once per layer, nothing else
    assert one["bytes_read"] == one["touched_bytes"] > 0
    assert fixed["bytes_read"] > one["bytes_read"]  # three passes of 32 read experts again
    assert r["targets"]["one_pass_read_vs_touched"] == {"value": 1.0, "goal": READ_GOAL, "met": True}
    assert r["raw_disk_bytes_per_s"] == 3e9 and len(r["disk_samples_bytes_per_s"]) == 5  # the median
    assert r["bound"]["read_s"] == one["touched_bytes"] / 3e9
    assert r["same_first_token"] is True
    assert len(one["ttft_runs_s"]) == len(fixed["ttft_runs_s"]) == 2
    # warm-up, then the two kinds alternated, all cold with cache 0; a warm run only when asked
    assert loads[0] == {"cache_mb": 0}
    assert [o.get("prefill_pass_tokens") for o in loads[1:5]] == [0, 32, 0, 32]
    assert [o.get("mlx_lm_shapes") for o in loads[1:5]] == [None, "off", None, "off"]  # the old passes as they were
    assert all(o["cold"] and o["cache_mb"] == 0 for o in loads[1:5])
    assert len(loads) == (6 if compute == "warm" else 5)
    assert (r["bound"]["compute_s"] is None) == (compute == "none")
    text = format_long_prompt(r)
    assert "long prompt: 96 tokens, cold, cache 0 (raw disk 3.00 GB/s)" in text
    assert "one_pass_read_vs_touched            1.000  (goal <= 1.1)  met" in text
    assert "fixed_passes_vs_one_pass_ttft" in text
    assert ("not measured" in text) == (compute == "none")


def test_bench_long_prompt_mode_from_the_command_line(tiny_model, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import shutil

    from engine.diagnostics.bench import main as bench_main
    from engine.storage.packed_layout import aligned

    model = tmp_path / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4), model)  # the bench packs the model it measures
    out = tmp_path / "bench.json"
    rc = bench_main(["--model", str(model), "--long-prompt", "48", "--prefill-chunk", "16", "--repeats", "1",
                     "--long-prompt-compute", "none", "--disk-bytes", str(2**20), "--json", str(out)])  # fmt: skip
    assert rc == 0
    r = json.loads(out.read_text())
    lp = r["long_prompt"]
    assert lp["prompt_tokens"] == 48 and lp["chunk"] == 16 and lp["same_first_token"] is True
    # cold, cache 0, packed: each touched expert read once, as whole aligned blobs (O_DIRECT)
    one = lp["one_pass"]
    stride = aligned(one["touched_bytes"] // one["touched_experts"])
    assert one["bytes_read"] in (one["touched_experts"] * stride, one["touched_bytes"])
    assert r["disk"] == {"raw_parallel_read_bytes_per_s": lp["raw_disk_bytes_per_s"]}
    assert "cold" not in r and "warm" not in r  # the long-prompt mode runs nothing else
    assert r["command"].startswith("moebar-engine bench")
    table = capsys.readouterr().out
    assert "long prompt: 48 tokens, cold, cache 0" in table and "compute not measured" in table

