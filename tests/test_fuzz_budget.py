"""The fuzzing budget: at least 10,000 hypothesis cases per CI run, and more in the `slow` runs.

Adds up `max_examples` over the hypothesis tests of the fuzz modules, split by the `slow` mark,
so lowering a test's count below the issue's budget fails here rather than going unnoticed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

CI_BUDGET = 10_000
SLOW_BUDGET = 50_000
FUZZ_MODULES = ("engine/test_fuzz.py", "app/test_tools_fuzz.py")


def _load(relative: str) -> ModuleType:
    path = Path(__file__).parent / relative
    spec = importlib.util.spec_from_file_location(f"fuzz_budget_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fuzz_cases() -> dict[str, dict[str, int]]:
    """max_examples of every hypothesis test in the fuzz modules, under "ci" or "slow"."""
    cases: dict[str, dict[str, int]] = {"ci": {}, "slow": {}}
    for relative in FUZZ_MODULES:
        module = _load(relative)
        for name, test in vars(module).items():
            if not name.startswith("test_") or not hasattr(test, "hypothesis"):
                continue
            slow = any(mark.name == "slow" for mark in getattr(test, "pytestmark", []))
            settings = test._hypothesis_internal_use_settings
            cases["slow" if slow else "ci"][f"{relative}::{name}"] = settings.max_examples
    return cases


def test_ci_runs_at_least_ten_thousand_fuzz_cases_and_slow_runs_more() -> None:
    cases = fuzz_cases()
    assert len(cases["ci"]) >= 9, cases  # the protocol, stdio, tool-call text, OpenAI and tool-argument fuzzers
    assert sum(cases["ci"].values()) >= CI_BUDGET, cases["ci"]
    assert sum(cases["slow"].values()) >= SLOW_BUDGET, cases["slow"]
