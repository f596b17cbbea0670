"""Engine paths the exactness tests do not take: a hot set that cannot be saved (mid-answer or at
close) never fails the answer or the close, and `plan` on one rank's share measures the disk on
the experts that share holds."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import pytest

from engine.cli import main
from engine.engine import Engine
from engine.types import EngineOptions, SamplingParams


def _partial_cache_mb(model: Path) -> float:
    from engine.model.loader import inspect_experts

    layers = inspect_experts(model).layers
    return 4 * layers[0].expert_bytes * len(layers) / 2**20  # 4 experts a layer of 16: hits and evictions


def test_a_hot_set_that_cannot_be_saved_fails_neither_the_answer_nor_the_close(
    tiny_model: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "engine.engine")
    model = tiny_model("qwen3_moe", 4)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    options = EngineOptions(cache_mb=_partial_cache_mb(model), hot_set_dir=str(blocker / "hot"))
    engine = Engine.load(model, options, measure_disk=False)
    try:
        engine._hot_set_saved_at -= 3600  # the last save was an hour ago: this answer saves the hot set
        tokens = [ev.token for ev in engine.generate([5, 6, 7, 8], SamplingParams(max_tokens=3))]
        assert len(tokens) == 3
        assert caplog.text.count("hot set not saved") == 1
    finally:
        engine.close()
    assert caplog.text.count("hot set not saved") == 2  # the close tried again, and still closed
    assert not (blocker / "hot").exists()
    engine.options = dataclasses.replace(engine.options, hot_set_dir="")
    assert engine.save_hot_set() == 0  # no folder: nothing to save


def test_plan_of_a_ranks_share_reads_only_the_experts_it_holds(tiny_model: Any, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    from engine.storage.rank_pack import pack_rank

    share = pack_rank(tiny_model("qwen3_moe", 4), 1, 2, tmp_path / "r1of2")
    assert main(["plan", str(share), "--json", "--samples", "8"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["layout"] == "packed" and plan["disk_read_bytes_per_s"] > 0


def test_options_and_step_figures_round_trip_through_json() -> None:
    from engine.types import StepFigures

    options = EngineOptions(cache_mb=512.0, memory_limit_mb=8192.0, experts_per_token=4, cold=True,
                            cache_policy="lru", hot_set_dir="/h", device="cpu")  # fmt: skip
    assert EngineOptions(**json.loads(json.dumps(options.to_dict()))) == options
    figures = StepFigures(tokens=3, bytes_read=4096, cache_hits=5, cache_misses=2)
    assert StepFigures(**json.loads(json.dumps(figures.to_dict()))) == figures


def test_a_trace_folder_gets_one_finished_trace_per_generation(tiny_model: Any, tmp_path: Path) -> None:
    from engine.diagnostics.traces import read_trace

    model = tiny_model("qwen3_moe", 4)
    engine = Engine.load(model, EngineOptions(cache_mb=_partial_cache_mb(model), trace_dir=str(tmp_path / "traces")),
                         measure_disk=False)  # fmt: skip
    try:
        for n in (2, 3):
            assert len([ev for ev in engine.generate([5, 6, 7], SamplingParams(max_tokens=n))]) == n
            assert engine._loaded.streamer.trace is None  # each trace is finished with its generation
    finally:
        engine.close()
    files = sorted((tmp_path / "traces").glob("trace-*.jsonl"), key=lambda p: p.stem.rsplit("-", 1)[1])
    assert [p.stem.rsplit("-", 1)[1] for p in files] == ["1", "2"]
    traces = [read_trace(p) for p in files]
    assert all(t.header.model_type == "qwen3_moe" and t.header.experts_per_token == engine.experts_per_token
               for t in traces)  # fmt: skip
    assert traces[1].decode_tokens == traces[0].decode_tokens + 1  # 2 tokens, then 3: one decode step more
    assert all(len(ids) == engine.experts_per_token for t in traces for ids in t.experts)
