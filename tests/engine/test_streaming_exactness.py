"""Streamed generation equals mlx-lm's in-memory model: same greedy tokens, logits within 1e-4."""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler

from engine.engine import Engine
from engine.model.loader import inspect_experts
from engine.types import EngineOptions, SamplingParams

# fp32 weights and activations; observed differences are 0.0 (the same kernels run on the same
# rows), the tolerance only allows for reordering inside a kernel.
LOGIT_ATOL = 1e-4
PROMPT = "The expert streaming engine reads only the routed experts"
N_TOKENS = 32

_reference_cache: dict[Path, tuple[list[int], list[int]]] = {}


def _reference(path: Path) -> tuple[list[int], list[int]]:
    """mlx-lm's own greedy generation on the fully loaded model: (prompt ids, generated ids)."""
    if path not in _reference_cache:
        model, tok = mlx_load(str(path))
        prompt = tok.encode(PROMPT, add_special_tokens=False)
        out = [r.token for r in stream_generate(model, tok, prompt, max_tokens=N_TOKENS, sampler=make_sampler(0.0))]
        _reference_cache[path] = (prompt, out)
    return _reference_cache[path]


def _budget_mb(path: Path, which: str) -> float:
    layers = inspect_experts(path).layers
    one = layers[0].expert_bytes / 2**20
    return {"zero": 0.0, "one": one, "all": sum(l.expert_bytes * l.num_experts for l in layers) / 2**20 + 1}[which]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("budget", ["zero", "one", "all"])
def test_streamed_tokens_equal_mlx_lm(tiny_model, model_type: str, bits: int, budget: str) -> None:
    path = tiny_model(model_type, bits)
    prompt, expected = _reference(path)
    engine = Engine.load(path, EngineOptions(cache_mb=_budget_mb(path, budget)), measure_disk=False)
    try:
        got = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
        counters = engine.expert_counters()
    finally:
        engine.close()
    assert got == expected
    assert counters["bytes_read"] > 0
    if budget == "all":
        # every expert is read at most once when the cache holds them all
        layers = inspect_experts(path).layers
        assert counters["bytes_read"] <= sum(l.expert_bytes * l.num_experts for l in layers)
    else:
        assert counters["cache_misses"] > 0


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_streamed_logits_match_in_memory_logits(tiny_model, model_type: str) -> None:
    path = tiny_model(model_type, 4)
    ref_model, tok = mlx_load(str(path))
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        tokens = mx.array(tok.encode(PROMPT, add_special_tokens=False))[None]
        ref_cache, our_cache = make_prompt_cache(ref_model), engine.make_kv_cache()
        ref = ref_model(tokens, cache=ref_cache)
        ours = engine.model(tokens, cache=our_cache)
        np.testing.assert_allclose(np.array(ours), np.array(ref), atol=LOGIT_ATOL, rtol=0)
        step = mx.array([[42]])
        np.testing.assert_allclose(
            np.array(engine.model(step, cache=our_cache)), np.array(ref_model(step, cache=ref_cache)), atol=LOGIT_ATOL, rtol=0
        )
    finally:
        engine.close()


def test_chunked_prefill_matches_token_by_token(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(100, 50_000, size=300)]
    results = {}
    for chunk in (128, 1):
        engine = Engine.load(path, EngineOptions(cache_mb=0, prefill_chunk=chunk), measure_disk=False)
        try:
            events = list(engine.generate(prompt, SamplingParams(max_tokens=8)))
        finally:
            engine.close()
        results[chunk] = ([e.token for e in events], events[-1].stats.prefill.bytes_read)
    assert results[128][0] == results[1][0]
    # routing a chunk together reads each needed expert once per chunk, not once per token
    assert results[128][1] < results[1][1] / 4


def test_prefetch_keeps_output_exact(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    prompt, expected = _reference(path)
    engine = Engine.load(path, EngineOptions(cache_mb=0, prefetch=True), measure_disk=False)
    try:
        got = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
        prefetched = engine.expert_counters()["prefetched_hits"]
    finally:
        engine.close()
    assert got == expected
    assert prefetched > 0


def test_lower_k_override_runs_and_reads_fewer_experts(tiny_model, capsys) -> None:
    path = tiny_model("qwen3_moe", 4)
    prompt, _ = _reference(path)
    engine = Engine.load(path, EngineOptions(cache_mb=0, experts_per_token=2), measure_disk=False)
    try:
        events = list(engine.generate(prompt, SamplingParams(max_tokens=4)))
        assert engine.experts_per_token == 2
        assert events[-1].stats.decode.cache_misses <= 2 * len(inspect_experts(path).layers) * 3
    finally:
        engine.close()
    assert "below the model's trained" in capsys.readouterr().err


@pytest.mark.parametrize("budget", ["zero", "all"])
def test_bf16_expert_scales_are_widened_exactly(tiny_model, budget: str) -> None:
    """Real 4-bit Qwen models store expert scales as bf16; on the CPU the slots hold them as fp32
    (widened once per read), which must not change a token."""
    path = tiny_model("qwen3_moe", 4, expert_scales_dtype="bfloat16")
    assert any(p.dtype == "BF16" for p in inspect_experts(path).layers[0].params)
    prompt, expected = _reference(path)
    engine = Engine.load(path, EngineOptions(cache_mb=_budget_mb(path, budget)), measure_disk=False)
    try:
        got = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
    finally:
        engine.close()
    assert got == expected
