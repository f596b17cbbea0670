"""The app's memory settings reach the engine (automatic cache, memory limit), and the plan's one
cache figure is shown with its reason in both the Model dialog and the side panel."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings
from app.ui import model_manager
from app.ui.model_manager import engine_options_from, read_memory_plan
from app.ui.model_panel import cache_text, plan_lines


def test_zero_means_automatic_cache_and_no_limit() -> None:
    o = engine_options_from(Settings())
    assert o.cache_mb is None and o.memory_limit_mb is None
    o = engine_options_from(Settings(cache_mb=2048, memory_limit_mb=24000))
    assert o.cache_mb == 2048 and o.memory_limit_mb == 24000


def test_the_plan_command_gets_auto_and_the_limit(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[list[str]] = []

    def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        seen.append(cmd)
        return subprocess.CompletedProcess(cmd, 0, json.dumps({"cache_budget_bytes": 1}), "")

    monkeypatch.setattr(model_manager.subprocess, "run", run)
    read_memory_plan(tmp_path, engine_options_from(Settings(memory_limit_mb=900)))
    cmd = seen[0]
    assert cmd[cmd.index("--cache-mb") + 1] == "auto"
    assert cmd[cmd.index("--memory-limit-mb") + 1] == "900.0"


def test_one_cache_row_with_its_reason() -> None:
    plan = {"cache_budget_bytes": 4_000_000_000, "cache_mode": "auto",
            "cache_reason": "15% of the 26.50 GiB spare RAM; the rest is left to the OS page cache",
            "memory_limit_bytes": None, "footprint_bytes": 16_000_000_000, "page_cache_reserve_bytes": 22_000_000_000}
    rows = dict(plan_lines(plan))
    assert rows["Expert cache"] == cache_text(plan)
    assert rows["Expert cache"].startswith("4.0 GB (automatic: 15% of the 26.50 GiB spare RAM")
    assert rows["Left to the OS page cache"] == "22.0 GB"
    assert "Memory limit" not in rows
    limited = dict(plan, cache_mode="limit", memory_limit_bytes=20_000_000_000, cache_reason="what the limit leaves")
    rows = dict(plan_lines(limited))
    assert rows["Expert cache"] == "4.0 GB (under the memory limit: what the limit leaves)"
    assert rows["Memory limit"] == "20.0 GB (planned use 16.0 GB)"
