"""Expert cache policies, routing traces and the replay tool (no model needed)."""

from __future__ import annotations

import functools
import json
import math
import random
import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from engine.cli import main as cli_main
from engine.diagnostics.cache_sim import compare, replay
from engine.diagnostics.synthetic_traces import RoutingModel, layer_overlap, routing, write_trace
from engine.diagnostics.traces import TraceError, TraceHeader, TraceRecorder, read_trace
from engine.model.cache_policies import DEFAULT_POLICY, LRFUPolicy, LRUPolicy, is_policy_name, make_policy
from engine.model.expert_cache import ExpertCache, SlotPool

import numpy as np


def _cache(slots: int, policy: str = "lru", layers: int = 1) -> ExpertCache:
    return ExpertCache(SlotPool([], slots), policy, layer_experts={l: 64 for l in range(layers)})


def _run(cache: ExpertCache, seq: list[int]) -> int:
    """Replay single-expert lookups of layer 0; return hits."""
    hits = 0
    for e in seq:
        if cache.lookup((0, e)) is not None:
            hits += 1
        else:
            cache.assign((0, e), {(0, e)})
    return hits


def test_lru_evicts_least_recent() -> None:
    cache = _cache(2)
    _run(cache, [1, 2, 1, 3])  # 2 is the least recent when 3 arrives
    assert set(cache.resident()) == {(0, 1), (0, 3)}


def test_lfu_keeps_frequent_expert_through_a_scan() -> None:
    # expert 0 is used often; a scan of new experts evicts it under LRU but not under LFU
    seq = [0, 0, 0, 0] + [1, 2, 3, 4] + [0]
    assert _run(_cache(2, "lru"), seq) == 3
    assert _run(_cache(2, "lfu"), seq) == 4


def test_lrfu_ages_old_counts() -> None:
    # expert 0 was hot long ago; with a short half-life recent experts outrank it
    old_hot = [0] * 6 + [1, 2] * 3
    short = _cache(2, "lrfu:0.25")
    _run(short, old_hot + [3])
    assert (0, 0) not in short
    never_ages = _cache(2, "lfu")
    _run(never_ages, old_hot + [3])
    assert (0, 0) in never_ages


def test_lrfu_keeps_history_of_evicted_keys() -> None:
    policy = LRFUPolicy(4, half_life=math.inf)
    for _ in range(5):
        policy.miss((0, 7))
    policy.miss((0, 8))
    assert policy.ranking()[:2] == [(0, 7), (0, 8)]


def test_layer_lru_holds_each_layer_to_its_share() -> None:
    cache = _cache(4, "lru-layer", layers=2)  # a share of 2 slots per layer
    for e in (1, 2):
        cache.lookup((0, e))
        cache.assign((0, e), {(0, e)})
    hits = 0
    for e in range(10, 30):  # layer 1 churns through new experts
        assert cache.lookup((1, e)) is None
        cache.assign((1, e), {(1, e)})
    for e in (1, 2):  # layer 0's experts survived the churn (plain LRU would have lost them)
        hits += cache.lookup((0, e)) is not None
    assert hits == 2
    lru = _cache(4, "lru", layers=2)
    _run(lru, [1, 2])
    for e in range(10, 30):
        lru.lookup((1, e))
        lru.assign((1, e), {(1, e)})
    assert (0, 1) not in lru and (0, 2) not in lru
    # a layer at its share replaces its own least recent expert
    cache.lookup((0, 3))
    cache.assign((0, 3), {(0, 3)})
    assert sorted(k for k in cache.resident() if k[0] == 0) == [(0, 2), (0, 3)]
    # a layer under its share takes a slot from the layer furthest over it
    fresh = _cache(4, "lru-layer", layers=2)
    for e in range(4):
        fresh.lookup((1, e))
        fresh.assign((1, e), {(1, e)})
    fresh.lookup((0, 9))
    fresh.assign((0, 9), {(0, 9)})
    assert (0, 9) in fresh and (1, 0) not in fresh


def test_victim_respects_exclusions() -> None:
    for name in ("lru", "lru-layer", "lrfu", "lfu", "arc", "wtinylfu", "lru-adaptive"):
        policy = make_policy(name, 3)
        for key in [(0, 1), (0, 2)]:
            policy.miss(key)
            policy.insert(key)
        assert policy.victim({(0, 1), (0, 2)}) is None
        assert policy.victim({(0, 1)}) == (0, 2)
        assert policy.victim({(0, 2)}) == (0, 1)  # the heap still holds (0, 1) after the skip


def test_policy_names() -> None:
    assert all(is_policy_name(n) for n in ("lru-layer", "lrfu", "lru", "lfu", "lrfu:2.5"))
    for bad in ("mru", "lrfu:x", "lrfu:0", "lrfu:-1", "lrfu:nan", "lru:3"):
        assert not is_policy_name(bad), bad
    with pytest.raises(ValueError, match="unknown cache policy 'mru'"):
        make_policy("mru", 4)


def _optimal_hits(seq: list[int], size: int) -> int:
    """Exhaustive search over every eviction choice (tiny sequences only)."""

    @functools.lru_cache(maxsize=None)
    def best(i: int, held: frozenset[int]) -> int:
        if i == len(seq):
            return 0
        e = seq[i]
        if e in held:
            return 1 + best(i + 1, held)
        if len(held) < size:
            return best(i + 1, held | {e})
        return max(best(i + 1, (held - {v}) | {e}) for v in held)

    return best(0, frozenset())


def _trace_of(seq: list[int], path: Path) -> Path:
    lines = [TraceHeader("t", 1, 8, 1).to_json()]
    lines += [json.dumps({"token": t, "layer": 0, "experts": [e]}) for t, e in enumerate(seq)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_belady_matches_exhaustive_optimum(tmp_path: Path) -> None:
    rng = random.Random(3)
    for case in range(12):
        seq = [rng.randrange(6) for _ in range(14)]
        size = 2 + case % 2
        trace = read_trace(_trace_of(seq, tmp_path / f"t{case}.jsonl"))
        got = replay(trace, size, "belady")
        assert round(got.hit_rate * len(seq)) == _optimal_hits(seq, size), seq
        for name in ("lru", "lru-layer", "lrfu", "arc", "wtinylfu", "lru-adaptive", "static-oracle"):
            assert replay(trace, size, name).hit_rate <= got.hit_rate + 1e-12


def test_replay_counts_decode_only_and_bytes(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    rows = [
        TraceHeader("t", 1, 8, 2, expert_bytes=1000).to_json(),
        json.dumps({"token": 0, "layer": 0, "experts": [1, 2], "prefill": True}),
        json.dumps({"token": 1, "layer": 0, "experts": [1, 3]}),
        json.dumps({"token": 2, "layer": 0, "experts": [3, 4]}),
    ]
    path.write_text("\n".join(rows) + "\n")
    r = replay(read_trace(path), 4, "lru")
    assert r.hit_rate == pytest.approx(2 / 4)  # 1 and 3 hit; 3 and 4 miss
    assert r.misses_per_token == pytest.approx(1.0)
    assert r.bytes_per_token == pytest.approx(1000.0)


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"token": 0, "layer": 0, "experts": [1, 2]', r"t\.jsonl:3: not a JSON object"),
        ('{"token": -1, "layer": 0, "experts": [1]}', r":3: field 'token'"),
        ('{"token": 0, "layer": "x", "experts": [1]}', r":3: field 'layer'"),
        ('{"token": 0, "layer": 0, "experts": []}', r":3: field 'experts'"),
        ('{"token": 0, "layer": 0, "experts": [1, 1]}', r":3: field 'experts' repeats"),
        ('{"token": 0, "layer": 0, "experts": [1], "prefill": 1}', r":3: field 'prefill'"),
        ('{"token": 0, "layer": 9, "experts": [1]}', r":3: layer 9 but the trace's model has 2 MoE layers"),
        ('{"token": 0, "layer": 0, "experts": [99]}', r":3: expert 99 but the trace's model has 16 experts"),
        ('[1, 2]', r":3: expected a JSON object"),
    ],
)
def test_bad_trace_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    good = json.dumps({"token": 0, "layer": 0, "experts": [3]})
    path.write_text(TraceHeader("t", 2, 16, 1).to_json() + "\n" + good + "\n" + line + "\n")
    with pytest.raises(TraceError, match=message):
        read_trace(path)


def test_trace_without_header_and_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"token": 0, "layer": 1, "experts": [5, 2]}\n')
    trace = read_trace(path)
    assert (trace.header.moe_layers, trace.header.experts_per_layer, trace.has_header) == (2, 6, False)
    with pytest.raises(TraceError, match="not found"):
        read_trace(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(TraceError, match="no routing lines"):
        read_trace(tmp_path / "empty.jsonl")
    (tmp_path / "v.jsonl").write_text('{"routing_trace": 7}\n')
    with pytest.raises(TraceError, match="unknown trace version 7"):
        read_trace(tmp_path / "v.jsonl")


def test_trace_from_another_model_is_refused() -> None:
    mine = TraceHeader("qwen3_moe", 4, 16, 4)
    mine.check_model(TraceHeader("qwen3_moe", 4, 16, 8), "x")  # K may differ (--experts-per-token)
    with pytest.raises(TraceError, match="trace is from another model: moe_layers is 4 in the trace but 60"):
        mine.check_model(TraceHeader("qwen3_5_moe", 60, 512, 10), "x")
    with pytest.raises(TraceError, match="experts_per_layer is 16 in the trace but 32"):
        mine.check_model(TraceHeader("qwen3_moe", 4, 32, 4), "x")


def test_recorder_numbers_tokens_across_steps(tmp_path: Path) -> None:
    rec = TraceRecorder(tmp_path / "r.jsonl", TraceHeader("t", 3, 8, 2))
    # a layer-major prefill pass of 3 tokens whose last layer runs for the last token only
    rec.record(0, np.array([[[1, 2], [2, 3], [3, 4]]]), True)
    rec.record(1, np.array([[[1, 2], [2, 3], [3, 4]]]), True)
    rec.record(2, np.array([[[5, 6]]]), True)
    for _ in range(2):  # two decode tokens
        for layer in range(3):
            rec.record(layer, np.array([[[0, 7]]]), False)
    rec.close()
    trace = read_trace(tmp_path / "r.jsonl")
    assert trace.tokens.tolist() == [0, 1, 2, 0, 1, 2, 2, 3, 3, 3, 4, 4, 4]
    assert trace.prefill.tolist() == [True] * 7 + [False] * 6
    assert trace.decode_tokens == 2


def test_cache_sim_cli_json_and_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write_trace(tmp_path / "s.jsonl", RoutingModel(moe_layers=3, experts_per_layer=32, experts_per_token=4), 60, 5)
    assert cli_main(["cache-sim", str(path), "--cache-experts", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["policy"] == DEFAULT_POLICY and out["cache_experts"] == 8
    assert 0 <= out["lru_hit_rate"] <= out["optimal_hit_rate"] <= 1
    assert 0 <= out["hit_rate"] <= out["optimal_hit_rate"]
    assert cli_main(["cache-sim", str(path), "--cache-experts", "25%", "--policy", "lru"]) == 0
    text = capsys.readouterr().out
    assert "cache 8 experts per layer (25.0%)" in text and "belady" in text
    assert cli_main(["cache-sim", str(path), "--cache-experts", "2"]) == 2
    assert "needs 4 slots" in capsys.readouterr().err
    assert cli_main(["cache-sim", str(path), "--cache-experts", "8", "--policy", "mru"]) == 2
    assert "--policy: unknown cache policy 'mru'" in capsys.readouterr().err


def test_synthetic_routing_is_deterministic_and_valid() -> None:
    model = RoutingModel(moe_layers=4, experts_per_layer=64, experts_per_token=6, seed=5)
    a, b = routing(model, 50), routing(model, 50)
    assert (a == b).all() and a.shape == (50, 4, 6)
    assert all(len(set(row)) == 6 for row in a.reshape(-1, 6).tolist())
    overlap = layer_overlap(a)
    assert overlap.shape == (4,) and (overlap > 0).all() and (overlap < 1).all()


def test_pending_warm_reads_are_waited_for_and_never_evicted() -> None:
    cache = _cache(2)
    gate = threading.Event()
    future: Future[int] = Future()

    def fill(slot: int) -> Future[int]:
        return future

    assert cache.claim_free((0, 5), fill)
    assert not cache.claim_free((0, 5), fill)  # resident already
    assert (0, 5) in cache.pending
    cache.assign((0, 6), {(0, 6)})  # takes the last free slot
    # the pending key is the only candidate, and it may not be evicted
    with pytest.raises(RuntimeError, match="pinned"):
        cache.assign((0, 7), {(0, 6)})
    threading.Timer(0.05, lambda: (future.set_result(10), gate.set())).start()
    cache.settle((0, 5))
    assert gate.is_set() and not cache.pending
    assert cache.lookup((0, 5)) is not None


def test_failed_warm_read_frees_its_slot() -> None:
    cache = _cache(2)
    future: Future[int] = Future()
    assert cache.claim_free((0, 5), lambda slot: future)
    future.set_exception(OSError("boom"))
    assert (0, 5) not in cache and not cache.pending and cache.free_slots == 2


def test_lru_ranking_and_hot_keys() -> None:
    cache = _cache(3, "lru")
    _run(cache, [1, 2, 3, 1])
    assert cache.hot_keys() == [(0, 1), (0, 3), (0, 2)]
    policy = LRUPolicy()
    policy.insert((0, 1))
    assert policy.ranking() == [(0, 1)]


def test_load_request_carries_the_cache_options() -> None:
    from engine.serving import protocol as p

    line = json.dumps({"v": 1, "type": "load", "model_dir": "/m", "options": {
        "cache_policy": "lru", "hot_set_dir": "/h", "trace_dir": "/t"}})
    req = p.decode_request(line)
    assert isinstance(req, p.LoadRequest)
    assert (req.options.cache_policy, req.options.hot_set_dir, req.options.trace_dir) == ("lru", "/h", "/t")
    assert p.decode_request(json.dumps({"v": 1, "type": "load", "model_dir": "/m"})).options.cache_policy == DEFAULT_POLICY
    bad = json.dumps({"v": 1, "type": "load", "model_dir": "/m", "options": {"cache_policy": "mru"}})
    with pytest.raises(p.ProtocolError, match="load.options.cache_policy"):
        p.decode_request(bad)


def test_lookup_of_a_key_being_warmed_waits_for_its_read() -> None:
    cache = _cache(2)
    future: Future[int] = Future()
    assert cache.claim_free((0, 5), lambda slot: future)
    threading.Timer(0.05, lambda: future.set_result(10)).start()
    assert cache.lookup((0, 5)) is not None  # returned only once the read had ended
    assert future.done() and not cache.pending
    failed: Future[int] = Future()
    assert cache.claim_free((0, 6), lambda slot: failed)
    threading.Timer(0.05, lambda: failed.set_exception(OSError("boom"))).start()
    assert cache.lookup((0, 6)) is None  # the failed read freed the slot: a miss


def test_recorded_engine_trace_replays() -> None:
    path = Path(__file__).resolve().parents[2] / "bench" / "traces" / "mini-preset-engine.jsonl"
    trace = read_trace(path)
    assert trace.has_header and trace.header.moe_layers == 8 and trace.decode_tokens == 299
    best = replay(trace, 4, "belady").hit_rate
    for name in ("lru", "lru-layer", "lrfu"):
        assert 0 < replay(trace, 4, name).hit_rate <= best
