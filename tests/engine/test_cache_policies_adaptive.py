"""The adaptive cache policies (ARC, W-TinyLFU admission, per-layer budgets from ghost hits), the
static-popularity oracle of the replay tool and the working-set trace generator."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.diagnostics.cache_sim import replay
from engine.diagnostics.synthetic_traces import RoutingModel, layer_overlap, main as synth_main, routing, write_trace
from engine.diagnostics.traces import TraceHeader, read_trace
from engine.model.cache_policies import is_policy_name, make_policy
from engine.model.cache_policies_adaptive import AdaptiveLayerLRUPolicy, ARCPolicy, WTinyLFUPolicy
from engine.model.expert_cache import ExpertCache, SlotPool


def _cache(slots: int, policy: str, layers: int = 1) -> ExpertCache:
    return ExpertCache(SlotPool([], slots), policy, layer_experts={l: 64 for l in range(layers)})


def _use(cache: ExpertCache, key: tuple[int, int]) -> bool:
    if cache.lookup(key) is not None:
        return True
    cache.assign(key, {key})
    return False


def _run(cache: ExpertCache, seq: list[int], layer: int = 0) -> int:
    return sum(_use(cache, (layer, e)) for e in seq)


def test_new_policy_names() -> None:
    for name in ("arc", "wtinylfu", "wtinylfu:0.2", "lru-adaptive"):
        assert is_policy_name(name), name
    for bad in ("wtinylfu:0", "wtinylfu:1", "wtinylfu:x", "arc:2", "lru-adaptive:1", "static-oracle"):
        assert not is_policy_name(bad), bad


@pytest.mark.parametrize("name", ["arc", "wtinylfu", "lru-adaptive"])
def test_victim_respects_exclusions(name: str) -> None:
    policy = make_policy(name, 3)
    for key in [(0, 1), (0, 2)]:
        policy.miss(key)
        policy.insert(key)
    assert policy.victim({(0, 1), (0, 2)}) is None
    assert policy.victim({(0, 1)}) == (0, 2)
    assert policy.victim({(0, 2)}) == (0, 1)


def test_arc_keeps_reused_keys_through_a_scan() -> None:
    # 0 and 1 are used twice (T2); a scan of one-time keys cycles through T1 and leaves them
    seq = [0, 1, 0, 1] + list(range(10, 30)) + [0, 1]
    assert _run(_cache(4, "arc"), seq) == 4
    assert _run(_cache(4, "lru"), seq) == 2


def test_arc_ghost_hit_grows_the_recency_side() -> None:
    policy = ARCPolicy(4)
    for key in [(0, 1), (0, 2)]:
        policy.miss(key)
        policy.insert(key)
    policy.remove((0, 1))  # evicted from T1: a ghost in B1
    assert (0, 1) in policy.b1 and policy.p == 0
    policy.miss((0, 1))
    assert policy.p == 1.0  # a B1 ghost hit: T1 should have been larger
    policy.insert((0, 1))
    assert (0, 1) in policy.t2  # seen before: it goes to the frequency side


def test_wtinylfu_admits_only_more_frequent_newcomers() -> None:
    cache = _cache(4, "wtinylfu:0.25")  # a window of 1 slot, 3 in the main area
    assert _run(cache, [0, 1, 2, 0, 1, 2, 0, 1, 2]) == 6  # 0, 1, 2 end up in the main area
    assert _run(cache, list(range(10, 20))) == 0  # a scan of one-time keys: each one
    for e in (0, 1, 2):  # ... is refused by the main area, so the frequent keys stay
        assert (0, e) in cache
    lru = _cache(4, "lru")
    _run(lru, [0, 1, 2, 0, 1, 2, 0, 1, 2] + list(range(10, 20)))
    assert not any((0, e) in lru for e in (0, 1, 2))
    # a newcomer used more often than the main victim is admitted in its place
    for _ in range(5):
        _use(cache, (0, 99))
    assert (0, 99) in cache


def test_wtinylfu_counts_age() -> None:
    policy = WTinyLFUPolicy(2, window=0.5)  # counts halve every 20 lookups
    for _ in range(8):
        policy.miss((0, 1))
    for e in range(12):
        policy.miss((0, 100 + e))
    assert policy.count[(0, 1)] == 4 and (0, 100) not in policy.count


def test_adaptive_budgets_move_to_the_layer_with_ghost_hits() -> None:
    def play(cache: ExpertCache) -> int:
        """Layer 0 cycles over 6 experts (all hits with 6 slots, none with 4); layer 1 streams new ones."""
        hits = 0
        for round_ in range(40):
            hits += _run(cache, list(range(6)), layer=0)
            hits += _run(cache, [100 + 2 * round_, 101 + 2 * round_], layer=1)
        return hits

    cache = _cache(8, "lru-adaptive", layers=2)  # equal targets at first: 4 and 4
    policy = cache.policy
    assert isinstance(policy, AdaptiveLayerLRUPolicy)
    adaptive = play(cache)
    assert policy.target[0] >= 6 and policy.target[1] <= 2
    assert sum(policy.target.values()) == pytest.approx(8)
    assert _run(cache, list(range(6)), layer=0) == 6
    assert adaptive > play(_cache(8, "lru-layer", layers=2)) + 100  # equal shares: layer 0 never hits


def _seq_trace(seq: list[int], path: Path) -> Path:
    lines = [TraceHeader("t", 1, 8, 1).to_json()]
    lines += [json.dumps({"token": t, "layer": 0, "experts": [e]}) for t, e in enumerate(seq)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_static_oracle_keeps_the_most_used_keys(tmp_path: Path) -> None:
    # 0 is used most overall, but in a burst; the oracle keeps it through the other keys
    seq = [0] * 5 + [1, 2, 3, 1, 2, 3] + [0]
    trace = read_trace(_seq_trace(seq, tmp_path / "t.jsonl"))
    oracle = replay(trace, 2, "static-oracle").hit_rate * len(seq)
    assert round(oracle) == 4 + 1  # the four repeats of 0 in the burst, and its last use
    assert replay(trace, 2, "static-oracle").hit_rate <= replay(trace, 2, "belady").hit_rate


def test_adaptive_policies_replay_within_the_optimum(tmp_path: Path) -> None:
    model = RoutingModel(moe_layers=3, experts_per_layer=32, experts_per_token=4, ws_size=8, ws_boost_lo=2, ws_boost_hi=3)
    trace = read_trace(write_trace(tmp_path / "s.jsonl", model, 80, 10))
    best = replay(trace, 6, "belady").hit_rate
    for name in ("arc", "wtinylfu", "lru-adaptive", "static-oracle"):
        assert 0 < replay(trace, 6, name).hit_rate <= best + 1e-12, name


def test_working_set_generator() -> None:
    drift = RoutingModel(moe_layers=4, experts_per_layer=64, experts_per_token=6, seed=5)
    plain = routing(drift, 60)
    # no boost: the drift generator draw for draw (its random stream is separate)
    assert (routing(replace(drift, ws_size=12), 60) == plain).all()
    ws = replace(drift, drift_sigma_lo=0.0, drift_sigma_hi=0.0, ws_size=8, ws_boost_lo=5.0, ws_boost_hi=5.0, ws_tokens=1e6)
    ids = routing(ws, 200)
    assert (routing(ws, 200) == ids).all()
    assert all(len(set(row)) == 6 for row in ids.reshape(-1, 6).tolist())
    # a strong, never-changing working set of 8: most picks come from 8 experts per layer
    top8 = [np.sort(np.bincount(ids[:, l].ravel(), minlength=64))[-8:].sum() / ids[:, l].size for l in range(4)]
    assert min(top8) > 0.6
    no_ws = routing(replace(ws, ws_boost_lo=0.0, ws_boost_hi=0.0), 200)
    assert layer_overlap(ids).mean() > layer_overlap(no_ws).mean() + 0.2


def test_synth_trace_generator_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for gen in ("drift", "working-set"):
        out = tmp_path / f"{gen}.jsonl"
        assert synth_main([str(out), "--tokens", "3", "--layers", "2", "--generator", gen]) == 0
        params = json.loads(capsys.readouterr().out)
        assert read_trace(out).decode_tokens == 3 and params["moe_layers"] == 2
    with pytest.raises(SystemExit):
        synth_main([str(tmp_path / "x.jsonl"), "--generator", "nope"])


def test_state_oracle_evicts_the_least_likely_expert() -> None:
    from engine.diagnostics.cache_bounds import StateOraclePolicy

    state = np.log(np.array([[[0.9, 0.1, 0.5, 0.2]], [[0.1, 0.9, 0.5, 0.2]]]))  # 2 tokens, 1 layer, 4 experts
    policy = StateOraclePolicy(state)
    for e in (0, 1, 2):
        policy.insert((0, e))
    assert policy.victim(set()) == (0, 1)
    assert policy.victim({(0, 1)}) == (0, 2)
    policy.at_token(1)
    assert policy.victim(set()) == (0, 0)
    assert policy.victim({(0, 0), (0, 1), (0, 2)}) is None


def test_bounds_on_a_small_synthetic_trace() -> None:
    from engine.diagnostics.cache_bounds import bounds, synthetic_trace

    model = RoutingModel(moe_layers=3, experts_per_layer=32, experts_per_token=4, zipf_s=1.0)
    trace, state = synthetic_trace(model, 60, 10)
    assert state.shape == (70, 3, 32) and trace.decode_tokens == 60
    results = bounds(trace, state, 6, ["lru"])
    names = [r.policy for r in results]
    assert names == ["belady", "lru", "static-oracle", "budget-oracle", "state-oracle"]
    best = results[0].hit_rate
    assert all(0 < r.hit_rate <= best + 1e-12 for r in results[1:])
    # the state is the generator's: its most likely experts are the ones routed to most
    ids = np.array([trace.experts[r] for r in range(len(trace.experts))]).reshape(70, 3, 4)
    hits = np.take_along_axis(state, ids, axis=2).mean()
    assert hits > state.mean() + 1.0


def test_replay_tells_a_clocked_policy_each_token(tmp_path: Path) -> None:
    seen: list[int] = []

    class Clocked(ARCPolicy):
        def at_token(self, token: int) -> None:
            seen.append(token)

    trace = read_trace(_seq_trace([1, 2, 1, 3], tmp_path / "t.jsonl"))
    r = replay(trace, 2, "clocked", factory=lambda slots, layers: Clocked(slots))
    assert seen == [0, 1, 2, 3] and r.policy == "clocked"
    assert r.hit_rate == replay(trace, 2, "arc").hit_rate


def test_lrfu_layer_ages_by_the_layers_own_lookups() -> None:
    def victim(name: str) -> tuple[int, int] | None:
        policy = make_policy(name, 4, 2)
        for key in [(0, 7), (0, 1), (1, 2)]:  # (1, 2) comes last in the pool, first in its layer
            policy.miss(key)
            policy.insert(key)
        policy.remove((0, 7))
        return policy.victim(set())

    assert victim("lrfu-layer:1") == (1, 2)  # one layer-1 lookup old against two of layer 0: older
    assert victim("lrfu:1") == (0, 1)  # the pool's clock makes the later layer look fresher
    assert is_policy_name("lrfu-layer") and is_policy_name("lrfu-layer:0.5") and not is_policy_name("lrfu-layer:0")


def test_budget_oracle_fits_budgets_to_each_layers_curve(tmp_path: Path) -> None:
    from engine.diagnostics.cache_bounds import FixedBudgetLRUPolicy, fitted_budgets, layer_lru_curves

    # layer 0 cycles over 6 experts (all hits from 6 slots), layer 1 never reuses one
    lines = [TraceHeader("t", 2, 64, 1).to_json()]
    for t in range(60):
        lines.append(json.dumps({"token": t, "layer": 0, "experts": [t % 6]}))
        lines.append(json.dumps({"token": t, "layer": 1, "experts": [t % 64]}))
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    trace = read_trace(path)
    curves = layer_lru_curves(trace, 7)
    assert curves[0, 5] == 0 and curves[0, 6] == 54 and curves[1, 7] == 0
    budgets = fitted_budgets(trace, 4)  # 8 slots in all
    assert budgets == {0: 7, 1: 1} or budgets == {0: 6, 1: 2}
    fixed = replay(trace, 4, "budget", factory=lambda slots, layers: FixedBudgetLRUPolicy(budgets))
    assert fixed.hit_rate == pytest.approx(54 / 120)
    assert replay(trace, 4, "lru-layer").hit_rate == 0


def test_reuse_distances() -> None:
    from engine.diagnostics.synthetic_traces import reuse_distances

    ids = np.array([[[0, 1]], [[1, 2]], [[0, 3]], [[4, 5]]])  # 1 at distance 1, 0 at distance 2
    assert reuse_distances(ids, 3).tolist() == pytest.approx([1 / 8, 1 / 8, 0.0])
    sticky = np.array([[[0, 1]]] * 5)
    assert reuse_distances(sticky, 2).tolist() == pytest.approx([0.8, 0.0])


def test_per_layer_wrapper() -> None:
    from engine.model.cache_policies import PerLayerPolicy

    # lru@layer is lru-layer, lookup for lookup
    seq = [(l, e) for t in range(40) for l in range(3) for e in ((t * 7 + l) % 11, (t + l) % 5)]
    a, b = _cache(9, "lru@layer", layers=3), _cache(9, "lru-layer", layers=3)
    assert [_use(a, k) for k in seq] == [_use(b, k) for k in seq]
    assert isinstance(a.policy, PerLayerPolicy) and a.policy.share == 3
    # each layer runs its own inner policy: layer 0's frequent key survives layer 0's own scan
    cache = _cache(8, "lfu@layer", layers=2)
    for _ in range(3):
        _use(cache, (0, 1))
    for e in range(10, 20):
        _use(cache, (0, e))
        _use(cache, (1, e))
    assert (0, 1) in cache and sum(k[0] == 1 for k in cache.resident()) == 4
    assert is_policy_name("wtinylfu:0.5@layer") and is_policy_name("arc@layer")
    for bad in ("mru@layer", "lru@layer@layer", "@layer"):
        assert not is_policy_name(bad), bad


def test_per_layer_policies_evict_for_a_prefetch_as_lru_layer_does() -> None:
    """A slot assigned without a miss first (prefetch) comes from the layer furthest over its share,
    not from whichever layer missed last."""
    from engine.model.expert_cache import ExpertCache, SlotPool

    def after_prefetch(name: str) -> list[tuple[int, int]]:
        cache = ExpertCache(SlotPool([], 6), name, layer_experts={0: 16, 1: 16, 2: 16})
        for key in [(2, 1), (2, 2), (2, 3), (1, 1), (0, 1), (0, 2)]:  # layer 2 holds 3 of its share of 2
            cache.lookup(key)
            cache.assign(key, {key})
        cache.assign((1, 3), set())  # a prefetch into layer 1: no lookup, no miss
        return sorted(cache.resident())  # type: ignore[arg-type]

    expected = after_prefetch("lru-layer")
    assert (2, 1) not in expected and (0, 2) in expected
    assert after_prefetch("lru@layer") == expected
    ghost = after_prefetch("wtinylfu-ghost@layer")  # its own pick inside layer 2, but from layer 2
    assert sum(k[0] == 2 for k in ghost) == 2 and sum(k[0] == 0 for k in ghost) == 2 and (1, 3) in ghost


def test_ghost_wtinylfu_keeps_no_ghost_of_a_resident_key() -> None:
    from engine.model.cache_policies_adaptive import GhostWTinyLFUPolicy

    policy = GhostWTinyLFUPolicy(6, window=0.5)
    for e in range(4):
        policy.miss((0, e))
        policy.insert((0, e))
    policy.remove((0, 3))  # a ghost now
    assert (0, 3) in policy.ghost_w or (0, 3) in policy.ghost_m
    policy.insert((0, 3))  # back without a miss (warm start, prefetch)
    assert (0, 3) not in policy.ghost_w and (0, 3) not in policy.ghost_m
    for _ in range(3):  # in and out again, from either area: a ghost of one list at a time
        policy.remove((0, 3))
        assert ((0, 3) in policy.ghost_w) != ((0, 3) in policy.ghost_m)
        policy.insert((0, 3))


def test_ghost_wtinylfu_sizes_its_window_by_ghost_hits() -> None:
    from engine.model.cache_policies_adaptive import GhostWTinyLFUPolicy

    policy = GhostWTinyLFUPolicy(10, window=0.5)
    assert policy.window_cap == 5
    for e in range(6):  # the window overflows into probation
        policy.miss((0, e))
        policy.insert((0, e))
    policy.remove((0, 5))  # from the window: a window ghost
    policy.remove((0, 0))  # from the main area: a main ghost
    policy.miss((0, 5))
    assert policy.window_cap == 6  # recency would have kept it: a larger window
    policy.miss((0, 0))
    assert policy.window_cap == 5
    assert policy.protected_cap == 4


def test_hill_climbing_window_moves_and_turns_back() -> None:
    from engine.model.cache_policies_adaptive import AdaptiveWTinyLFUPolicy

    policy = AdaptiveWTinyLFUPolicy(100, window=0.5, step=0.1)
    policy.period = 10
    for _ in range(10):
        policy.miss((0, 1))  # a first period: hit rate 0
    assert policy.share == pytest.approx(0.6) and policy.window_cap == 60
    policy.insert((0, 1))
    for _ in range(10):
        policy.touch((0, 1))  # better: keep going
    assert policy.share == pytest.approx(0.7)
    for _ in range(10):
        policy.miss((0, 2))  # worse: turn back with a smaller step
    assert policy.share == pytest.approx(0.63)


def test_per_layer_hot_keys_interleave_the_layers_rankings() -> None:
    cache = _cache(4, "wtinylfu-ghost@layer", layers=2)
    for key in [(0, 1), (0, 1), (0, 1), (0, 2), (1, 5), (1, 6), (1, 6)]:
        _use(cache, key)
    assert cache.hot_keys() == [(0, 1), (1, 6), (0, 2), (1, 5)]


def test_engine_default_is_the_chosen_policy() -> None:
    from engine.model.cache_policies import DEFAULT_POLICY, PerLayerPolicy
    from engine.types import EngineOptions

    assert EngineOptions().cache_policy == DEFAULT_POLICY == "wtinylfu-ghost@layer"
    assert isinstance(make_policy(DEFAULT_POLICY, 60, 6), PerLayerPolicy)


def test_working_set_calibration_only_moves_downhill() -> None:
    from engine.diagnostics import synthetic_traces as st

    report = st.calibrate_working_set(layers=2, tokens=40, rounds=1)
    errors = [step["rms_error"] for step in report["path"]]
    assert errors == sorted(errors, reverse=True)  # each accepted move lowered the error
    assert report["rms_error"] == errors[-1] <= report["start"]["rms_error"]
    assert len(report["other_starts"]) == len(st.WS_STARTS) - 1
    assert report["rms_error"] <= min(run["rms_error"] for run in report["other_starts"])
    assert set(report["fitted"]) == set(st._WS_STEPS) and report["generator"] == "working-set"


def test_calibrate_cli_keeps_the_other_generators_fit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.diagnostics import synthetic_traces as st

    fake = {"fitted": {"zipf_s": 1.0}, "rms_error": 0.5, "measured": {}}
    monkeypatch.setattr(st, "calibrate_working_set", lambda: {**fake, "generator": "working-set"})
    monkeypatch.setattr(st, "calibrate", lambda: {**fake, "generator": "drift"})
    out = tmp_path / "calibration.json"
    out.write_text(json.dumps({"fitted": {"zipf_s": 0.35}, "rms_error": 0.08}))  # the first fit's file
    assert st.main([str(out), "--calibrate"]) == 0
    saved = json.loads(out.read_text())
    assert saved["drift"]["fitted"] == {"zipf_s": 0.35} and saved["working-set"]["generator"] == "working-set"
    assert st.main([str(out), "--calibrate", "--generator", "drift"]) == 0
    saved = json.loads(out.read_text())
    assert saved["drift"]["generator"] == "drift" and saved["working-set"]["generator"] == "working-set"
