"""Routing traces recorded by the engine, warm start of the hot set, and the cache's figures:
all with tokens equal to mlx-lm's."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from engine.cli import main as cli_main
from engine.diagnostics.cache_sim import replay
from engine.diagnostics.traces import read_trace
from engine.engine import Engine
from engine.model.hot_set import hot_set_path
from engine.types import EngineOptions, SamplingParams
from engine.model.loader import inspect_experts
from exactness import share_tokenizers

TOKENS = 16
PROMPT = 96
PREFILL_CHUNK = 40  # three prefill chunks


def long_prompt(n: int) -> list[int]:
    """``n`` random token ids inside the tiny tokenizer's vocabulary."""
    return [int(t) for t in np.random.default_rng(0).integers(100, 50_000, size=n)]


def cache_mb(path: Path, size: str) -> float:
    """A budget holding every expert ("all") or 3/8 of them ("partial": hits and evictions)."""
    layers = inspect_experts(path).layers
    total = sum(l.expert_bytes * l.num_experts for l in layers)
    return (total + 2**20 if size == "all" else total * 3 / 8) / 2**20




@pytest.fixture(autouse=True)
def _tokenizer_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the tokenizer once for every Engine.load here (seconds each; tests compare token ids)."""
    share_tokenizers(monkeypatch)


@pytest.fixture(scope="module")
def model(tiny_model) -> Path:
    return tiny_model("qwen3_moe", 4)


@pytest.fixture(scope="module")
def reference(model: Path) -> list[int]:
    """mlx-lm's own greedy generation on the fully loaded model."""
    ref_model, tok = mlx_load(str(model))
    prompt = mx.array(long_prompt(PROMPT))
    return [r.token for r in stream_generate(ref_model, tok, prompt, max_tokens=TOKENS, sampler=make_sampler(0.0))]


def _run(model: Path, options: EngineOptions, trace: Path | None = None) -> tuple[list[int], Engine]:
    engine = Engine.load(model, options, measure_disk=False)
    if trace is not None:
        engine.start_trace(trace)
    tokens = [ev.token for ev in engine.generate(long_prompt(PROMPT), SamplingParams(max_tokens=TOKENS))]
    return tokens, engine


def test_trace_records_every_layer_and_keeps_tokens_exact(model: Path, reference: list[int], tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    options = EngineOptions(cache_mb=cache_mb(model, "all"), prefill_chunk=PREFILL_CHUNK)
    tokens, engine = _run(model, options, path)
    try:
        counters = engine.expert_counters()
        layers = engine._loaded.layers
    finally:
        engine.close()
    assert tokens == reference
    trace = read_trace(path)
    h = trace.header
    assert (h.model_type, h.moe_layers, h.experts_per_layer) == ("qwen3_moe", len(layers), layers[0].num_experts)
    assert h.expert_bytes == layers[0].expert_bytes
    decode = trace.tokens[~trace.prefill]
    # the first generated token comes from the prefill: TOKENS - 1 decode steps, every layer each
    assert len(set(decode.tolist())) == TOKENS - 1 and len(decode) == (TOKENS - 1) * h.moe_layers
    assert set(trace.tokens[trace.prefill].tolist()) == set(range(PROMPT))
    assert all(len(e) == h.experts_per_token for e in trace.experts)
    # while tracing, fully resident layers route on the host (the ids are recorded there)
    assert counters["device_routed_calls"] == 0
    # the replay of a pool that holds everything misses only each expert's first use
    assert replay(trace, h.experts_per_layer, "lru").hit_rate > 0.5


def test_trace_from_cli_and_refused_for_another_model(model: Path, tiny_model, tmp_path: Path, capsys) -> None:
    path = tmp_path / "cli.jsonl"
    rc = cli_main(["generate", str(model), "--prompt", "hello there", "--max-tokens", "3", "--trace", str(path), "--json"])
    assert rc == 0
    capsys.readouterr()
    assert cli_main(["cache-sim", str(path), "--cache-experts", "4", "--model", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_experts"] == 4
    other = tiny_model("qwen3_moe", 4, num_experts=32)
    assert cli_main(["cache-sim", str(path), "--cache-experts", "4", "--model", str(other)]) == 2
    err = capsys.readouterr().err
    assert "trace is from another model: experts_per_layer is 16 in the trace but 32 in the model" in err


def test_warm_start_reads_the_hot_set_back_and_stays_exact(model: Path, reference: list[int], tmp_path: Path) -> None:
    options = EngineOptions(cache_mb=cache_mb(model, "partial"), prefill_chunk=PREFILL_CHUNK, hot_set_dir=str(tmp_path))
    tokens, engine = _run(model, options)
    held = {c: set(c.resident()) for c in engine._loaded.streamer.caches}
    saved_bytes = engine.expert_counters()["cache_saved_bytes"]
    engine.close()
    assert tokens == reference
    assert saved_bytes > 0
    saved = json.loads(hot_set_path(tmp_path, model).read_text())
    assert sum(len(ids) for ids in saved["layers"].values()) == sum(len(k) for k in held.values())

    engine = Engine.load(model, options, measure_disk=False)
    try:
        assert engine.warmer is not None and engine.warmer.join(timeout=30)
        warmed = set().union(*(set(c.resident()) for c in engine._loaded.streamer.caches))
        assert warmed == set().union(*held.values())  # the same experts, read before any request
        assert engine.warmer.bytes_read > 0
        again = [ev.token for ev in engine.generate(long_prompt(PROMPT), SamplingParams(max_tokens=TOKENS))]
        hits = engine.expert_counters()["cache_hits"]
    finally:
        engine.close()
    assert again == reference
    assert hits > 0


def test_hot_set_of_another_model_is_ignored(model: Path, tmp_path: Path, caplog) -> None:
    path = hot_set_path(tmp_path, model)
    path.write_text(json.dumps({"hot_set": 1, "moe_layers": 60, "experts_per_layer": [512] * 60, "layers": {}}))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    # the trace folder cannot be made: the answer goes on without a trace
    options = EngineOptions(cache_mb=cache_mb(model, "partial"), hot_set_dir=str(tmp_path), trace_dir=str(blocker / "x"))
    engine = Engine.load(model, options, measure_disk=False)
    try:
        assert engine.warmer is None
        tokens = [ev.token for ev in engine.generate([5, 6, 7], SamplingParams(max_tokens=2))]
    finally:
        engine.close()
    assert len(tokens) == 2
    assert "hot set ignored: it is from another model" in caplog.text
    assert "routing trace not recorded" in caplog.text


def test_the_cache_policy_option_reaches_every_pool(model: Path) -> None:
    from engine.model.cache_policies import LayerLRUPolicy, LRUPolicy, PerLayerPolicy

    for name, kind in (("lru", LRUPolicy), ("lru-layer", LayerLRUPolicy), (EngineOptions().cache_policy, PerLayerPolicy)):
        engine = Engine.load(model, EngineOptions(cache_mb=cache_mb(model, "partial"), cache_policy=name), measure_disk=False)
        try:
            assert all(type(c.policy) is kind for c in engine._loaded.streamer.caches), name
        finally:
            engine.close()
