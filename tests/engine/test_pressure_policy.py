"""The memory-pressure policy: when the expert cache shrinks and grows (fake readings, fake clock)."""

from __future__ import annotations

import pytest

from engine.serving.pressure_policy import CRITICAL_STEP_S, NORMAL_HOLD_S, WARNING_HOLD_S, PressurePolicy, PressureWatcher


def _run(policy: PressurePolicy, readings: list[tuple[float, str]]) -> list[tuple[float, str]]:
    """Feed (time, level) readings; apply every action as a successful resize; return the actions."""
    actions: list[tuple[float, str]] = []
    for now, level in readings:
        action = policy.observe(level, now)
        if action is not None:
            policy.applied(action, now, changed=True)
            actions.append((now, action))
    return actions


def _every(start: float, end: float, level: str, step: float = 2.0) -> list[tuple[float, str]]:
    """Readings every ``step`` from ``start`` up to ``end`` inclusive."""
    n = int((end - start) / step) + 1
    return [(start + i * step, level) for i in range(n)]


def test_critical_shrinks_at_once_then_once_per_step() -> None:
    policy = PressurePolicy()
    actions = _run(policy, _every(0, 25, "critical"))
    assert actions == [(0, "shrink"), (CRITICAL_STEP_S, "shrink"), (2 * CRITICAL_STEP_S, "shrink")]
    assert policy.steps_down == 3


def test_warning_shrinks_only_when_it_lasts() -> None:
    policy = PressurePolicy()
    # a warning shorter than the hold, broken by a normal reading: nothing
    readings = _every(0, WARNING_HOLD_S - 2, "warning") + [(WARNING_HOLD_S - 2, "normal")]
    assert _run(policy, readings) == []
    # a lasting one: the first shrink after the hold (counted from its first reading), then once per hold
    start = 100.0
    actions = _run(policy, _every(start, start + 2 * WARNING_HOLD_S + 1, "warning"))
    assert actions == [(start + WARNING_HOLD_S, "shrink"), (start + 2 * WARNING_HOLD_S, "shrink")]


def test_normal_grows_back_one_step_per_calm_spell() -> None:
    policy = PressurePolicy()
    _run(policy, [(0, "critical"), (CRITICAL_STEP_S, "critical")])
    assert policy.steps_down == 2
    t = CRITICAL_STEP_S + 2
    actions = _run(policy, _every(t, t + 2 * NORMAL_HOLD_S + 1, "normal"))
    assert actions == [(t + NORMAL_HOLD_S, "grow"), (t + 2 * NORMAL_HOLD_S, "grow")]
    assert policy.steps_down == 0
    # back at the budget's size: calm asks for nothing more
    assert _run(policy, _every(t + 3 * NORMAL_HOLD_S, t + 5 * NORMAL_HOLD_S, "normal")) == []


def test_pressure_during_calm_restarts_the_wait_to_grow() -> None:
    policy = PressurePolicy()
    _run(policy, [(0, "critical")])
    t = NORMAL_HOLD_S - 10
    readings = _every(2, t, "normal") + [(t, "warning")] + _every(t + 2, t + NORMAL_HOLD_S, "normal")
    assert _run(policy, readings) == []  # the warning (too short to shrink) broke the calm spell
    assert policy.observe("normal", t + 2 + NORMAL_HOLD_S) == "grow"


def test_unknown_readings_neither_shrink_nor_count_as_calm() -> None:
    policy = PressurePolicy()
    _run(policy, [(0, "critical")])
    readings = _every(2, NORMAL_HOLD_S + 10, "normal")
    readings[len(readings) // 2] = (readings[len(readings) // 2][0], "unknown")
    assert _run(policy, readings) == []
    assert _run(policy, _every(0, 100, "unknown")) == []


def test_the_floor_stops_shrinking_until_a_grow() -> None:
    policy = PressurePolicy()
    assert policy.observe("critical", 0) == "shrink"
    policy.applied("shrink", 0, changed=False)  # the cache is at its K working slots already
    assert policy.at_floor and policy.steps_down == 0
    assert [policy.observe("critical", t) for t in (10, 20, 60)] == [None, None, None]


def test_a_grow_that_finds_the_cache_full_forgets_the_steps() -> None:
    policy = PressurePolicy()
    _run(policy, [(0, "critical")])
    assert policy.observe("normal", 2) is None
    assert policy.observe("normal", 2 + NORMAL_HOLD_S) == "grow"
    policy.applied("grow", 2 + NORMAL_HOLD_S, changed=False)
    assert policy.steps_down == 0
    assert policy.observe("normal", 2 + 3 * NORMAL_HOLD_S) is None


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ValueError, match="warning_hold_s must be >= 0, got -1"):
        PressurePolicy(warning_hold_s=-1)
    with pytest.raises(ValueError, match="period_s must be > 0, got 0"):
        PressureWatcher(lambda: None, 0)
    with pytest.raises(ValueError, match="action must be 'shrink' or 'grow', got 'halve'"):
        PressurePolicy().applied("halve", 0, True)  # type: ignore[arg-type]
