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
