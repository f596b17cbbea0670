"""Streamed generation equals mlx-lm's in-memory model: same tokens, logits within 1e-4.

Every comparison is with mlx-lm's own generation on the same weights, at the sizes users run:
a 300-token prompt prefilled in three chunks, 64 generated tokens on references that do not loop,
and expert caches of zero, partial (hits and evictions across layers) and all experts (see
tests/exactness.py for what each size means and how a run is checked to have done it).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model

import engine.model.streamed_moe as streamed_moe
from engine.engine import Engine
from engine.model.loader import inspect_experts
from engine.storage.pack import pack_model
from engine.types import EngineOptions, SamplingParams
from exactness import (
    CACHE_SIZES,
    GENERATED_TOKENS,
    PREFILL_CHUNK,
    assert_not_degenerate,
    cache_mb,
    check_cache_was_exercised,
    long_prompt,
    mlx_lm_reference,
    share_tokenizers,
)

# fp32 weights and activations; observed differences are 0.0 (the same kernels run on the same
# rows), the tolerance only allows for reordering inside a kernel.
LOGIT_ATOL = 1e-4

_reference_cache: dict[tuple, list[int]] = {}


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch) -> None:
    share_tokenizers(monkeypatch)


def _reference(path: Path, **kwargs) -> list[int]:
    """mlx-lm's generation for the long prompt (memoised per model and settings)."""
    key = (path, tuple(sorted(kwargs.items())))
    if key not in _reference_cache:
        _reference_cache[key] = mlx_lm_reference(path, long_prompt(), **kwargs)
    return _reference_cache[key]


def _generate(path: Path, options: EngineOptions, sampling: SamplingParams | None = None, size: str | None = None):
    """The engine's tokens for the long prompt; checks the cache did what ``size`` means."""
    engine = Engine.load(path, options, measure_disk=False)
    try:
        got = [ev.token for ev in engine.generate(long_prompt(), sampling or SamplingParams(max_tokens=GENERATED_TOKENS))]
        if size is not None:
            check_cache_was_exercised(engine, size)
    finally:
        engine.close()
    return got


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("size", CACHE_SIZES)
def test_streamed_tokens_equal_mlx_lm(tiny_model, model_type: str, bits: int, size: str) -> None:
    """300-token prompt in three chunks, 64 greedy tokens, at each cache size."""
    path = tiny_model(model_type, bits)
    expected = _reference(path)
    assert_not_degenerate(expected)
    options = EngineOptions(cache_mb=cache_mb(path, size), prefill_chunk=PREFILL_CHUNK)
    assert _generate(path, options, size=size) == expected


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_prompt_in_several_prefill_passes_equals_mlx_lm(tiny_model, model_type: str) -> None:
    """The 300-token prompt in three layer-major passes (128 + 128 + 44) with a partial cache."""
    path = tiny_model(model_type, 4)
    options = EngineOptions(cache_mb=cache_mb(path, "partial"), prefill_chunk=64, prefill_pass_tokens=128)
    engine = Engine.load(path, options, measure_disk=False)
    try:
        assert engine.layer_major_prefill and engine.prefill_pass_tokens == 128
        events = list(engine.generate(long_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS)))
        check_cache_was_exercised(engine, "partial")
    finally:
        engine.close()
    assert [e.token for e in events] == _reference(path)


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_streamed_logits_match_in_memory_logits(tiny_model, model_type: str) -> None:
    path = tiny_model(model_type, 4)
    ref_model, _ = load_model(path)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        tokens = mx.array(long_prompt(12))[None]
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
    prompt = long_prompt()
    results = {}
    for chunk in (128, 1):  # prefill passes over the experts of 128 tokens, then of one token
        engine = Engine.load(path, EngineOptions(cache_mb=0, prefill_pass_tokens=chunk), measure_disk=False)
        try:
            events = list(engine.generate(prompt, SamplingParams(max_tokens=8)))
        finally:
            engine.close()
        results[chunk] = ([e.token for e in events], events[-1].stats.prefill.bytes_read)
    assert results[128][0] == results[1][0] == _reference(path)[:8]
    # routing a chunk together reads each needed expert once per chunk, not once per token
    assert results[128][1] < results[1][1] / 4


@pytest.mark.parametrize("size", ["zero", "partial"])
def test_prefetch_keeps_output_exact(tiny_model, size: str) -> None:
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, size), prefetch=True), measure_disk=False)
    try:
        got = [ev.token for ev in engine.generate(long_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS))]
        check_cache_was_exercised(engine, size)
        prefetched = engine.expert_counters()["prefetched_hits"]
    finally:
        engine.close()
    assert got == _reference(path)
    assert prefetched > 0


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_5_moe"])
def test_lower_k_equals_mlx_lm_at_that_k(tiny_model, model_type: str, capsys) -> None:
    """--experts-per-token 2 (trained 4) gives mlx-lm's tokens with its MoE blocks at top_k=2."""
    path = tiny_model(model_type, 4)
    expected = _reference(path, experts_per_token=2)
    assert_not_degenerate(expected)
    assert expected != _reference(path)  # K matters on this model: the comparison can fail
    engine = Engine.load(
        path, EngineOptions(cache_mb=cache_mb(path, "partial"), experts_per_token=2, prefill_chunk=PREFILL_CHUNK),
        measure_disk=False,
    )
    try:
        assert engine.experts_per_token == 2
        events = list(engine.generate(long_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS)))
        check_cache_was_exercised(engine, "partial")
    finally:
        engine.close()
    assert [e.token for e in events] == expected
    # one decode step reads at most K experts per layer
    layers = len(inspect_experts(path).layers)
    assert all(e.step.cache_misses <= 2 * layers for e in events[1:])
    assert "below the model's trained" in capsys.readouterr().err


SAMPLED = {
    "temperature": dict(temperature=0.8, seed=11),
    "top_p_top_k": dict(temperature=1.0, top_p=0.9, top_k=20, seed=12),
    "min_p": dict(temperature=0.7, min_p=0.05, seed=13),
    "repetition_penalty_greedy": dict(repetition_penalty=1.3),
    "repetition_penalty_sampled": dict(temperature=0.9, repetition_penalty=1.2, seed=14),
}


@pytest.mark.parametrize("name", SAMPLED)
def test_sampled_decoding_equals_mlx_lm_at_the_same_seed(tiny_model, name: str) -> None:
    """Sampling settings give mlx-lm's tokens at the same seed, and the same tokens on a rerun."""
    path = tiny_model("qwen3_moe", 4)
    settings = SAMPLED[name]
    expected = _reference(path, **settings)
    assert_not_degenerate(expected)
    assert expected != _reference(path)  # the settings change the tokens: the comparison can fail
    sampling = SamplingParams(
        temperature=settings.get("temperature", 0.0),
        top_p=settings.get("top_p", 1.0),
        top_k=settings.get("top_k", 0),
        min_p=settings.get("min_p", 0.0),
        repetition_penalty=settings.get("repetition_penalty", 1.0),
        seed=settings.get("seed"),
        max_tokens=GENERATED_TOKENS,
    )
    # The CPU's dense-GEMM prefill equals MLX's kernels to 2e-5, not bit for bit (tests/engine/
    # test_prefill_matmul.py): a sample drawn near a boundary could differ, so sampling is compared
    # on MLX's own kernels, whose logits equal mlx-lm's exactly.
    options = EngineOptions(cache_mb=cache_mb(path, "partial"), prefill_chunk=PREFILL_CHUNK, prefill_matmul="off")
    first = _generate(path, options, sampling, size="partial")
    assert first == expected
    assert _generate(path, options, sampling) == first  # reproducible


@pytest.mark.parametrize("size", ["partial", "all"])
def test_multi_bank_pools_are_exact(tiny_model, monkeypatch, size: str) -> None:
    """Slot pools split into banks (as for models whose pool would pass MLX's array limit)."""
    path = tiny_model("qwen3_next", 4)
    largest = max(p.nbytes for p in inspect_experts(path).layers[0].params)  # fp32 scales: none widened
    monkeypatch.setattr(streamed_moe, "max_array_bytes", lambda: largest * 16)  # 16 slots a bank
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, size), prefill_chunk=PREFILL_CHUNK), measure_disk=False)
    try:
        caches = engine._loaded.streamer.caches
        assert len(caches) > 1
        assert len({id(c) for c in engine._loaded.streamer.cache_of_layer}) == len(caches)
        got = [ev.token for ev in engine.generate(long_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS))]
        check_cache_was_exercised(engine, size)
    finally:
        engine.close()
    assert got == _reference(path)


def test_packed_cold_layout_is_exact(tiny_model, tmp_path: Path) -> None:
    """The packed per-expert layout read cold (page cache bypassed) through Engine.generate."""
    src = tiny_model("qwen3_5_moe", 4)
    path = tmp_path / "model"
    shutil.copytree(src, path)
    pack_model(path, io_threads=2)
    options = EngineOptions(cache_mb=cache_mb(path, "partial"), cold=True, prefill_chunk=PREFILL_CHUNK)
    engine = Engine.load(path, options, measure_disk=False)
    try:
        assert engine.plan.layout == "packed"
        got = [ev.token for ev in engine.generate(long_prompt(), SamplingParams(max_tokens=GENERATED_TOKENS))]
        check_cache_was_exercised(engine, "partial")
    finally:
        engine.close()
    assert got == _reference(src)


@pytest.mark.parametrize("size", ["partial", "all"])
def test_bf16_expert_scales_are_widened_exactly(tiny_model, size: str) -> None:
    """Real 4-bit Qwen models store expert scales as bf16; on the CPU the slots hold them as fp32
    (widened once per read), which must not change a token."""
    path = tiny_model("qwen3_moe", 4, expert_scales_dtype="bfloat16")
    assert any(p.dtype == "BF16" for p in inspect_experts(path).layers[0].params)
    expected = _reference(path)
    assert_not_degenerate(expected)
    options = EngineOptions(cache_mb=cache_mb(path, size), prefill_chunk=PREFILL_CHUNK)
    assert _generate(path, options, size=size) == expected
