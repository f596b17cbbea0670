"""bf16 activations end to end: streamed generation equals mlx-lm's in-memory generation with the
model cast to bf16, as Macs run real models. Runs on MLX's CPU here (bf16 kernels exist there);
on a GPU machine set MOEBAR_TEST_DEVICE=gpu (default "auto" picks the GPU where MLX has one), and
mlx-lm's reference runs on the same default device."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

from engine.engine import Engine
from engine.types import EngineOptions, SamplingParams
from tests.exactness import check_cache_was_exercised, long_prompt

DEVICE = os.environ.get("MOEBAR_TEST_DEVICE", "auto")
TOKENS = 24


def _reference_bf16(path, prompt: list[int]) -> list[int]:  # type: ignore[no-untyped-def]
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    model.set_dtype(mx.bfloat16)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=TOKENS, sampler=make_sampler(temp=0.0))]


def _cache_mb(path, size: str) -> float:  # type: ignore[no-untyped-def]
    from tests.exactness import cache_mb

    return cache_mb(path, size)


@pytest.mark.parametrize("model_type", ["qwen3_moe", pytest.param("qwen3_next", marks=pytest.mark.slow)])
@pytest.mark.parametrize("size", ["zero", "partial"])
def test_bf16_streamed_tokens_equal_mlx_lm_in_bf16(tiny_model, model_type: str, size: str) -> None:  # type: ignore[no-untyped-def]
    path = tiny_model(model_type, 4, expert_scales_dtype="bfloat16")
    prompt = long_prompt(80)
    engine = Engine.load(path, EngineOptions(cache_mb=_cache_mb(path, size), device=DEVICE, activation_dtype="bfloat16",
                                             prefill_chunk=32), measure_disk=False)  # fmt: skip
    try:
        assert engine._loaded.activation_dtype == "bfloat16"
        norms = [v for k, v in tree_flatten(engine.model.parameters()) if k.endswith("norm.weight")]
        assert norms and all(v.dtype == mx.bfloat16 for v in norms)
        got = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=TOKENS))]
        check_cache_was_exercised(engine, size)
        slot_dtypes = {a.dtype for c in engine._loaded.streamer.caches for k, a in c.pool.arrays.items() if k.endswith("scales")}
    finally:
        engine.close()
    assert slot_dtypes == {mx.bfloat16}  # bf16 scales stay bf16 beside bf16 activations (no widening)
    assert got == _reference_bf16(path, prompt)
    # (qwen3_next, whose gated-delta layers are slow in bf16 on the CPU, is marked slow here)


def test_bf16_and_fp32_runs_differ_so_the_bf16_check_means_something(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """The dtype reaches the arithmetic: bf16 logits differ from fp32 ones on the same weights."""
    path = tiny_model("qwen3_moe", 4, expert_scales_dtype="bfloat16")
    logits = {}
    for dtype in ("float32", "bfloat16"):
        engine = Engine.load(path, EngineOptions(cache_mb=0, device=DEVICE, activation_dtype=dtype), measure_disk=False)
        try:
            cache = engine.make_kv_cache()
            out = engine.model(mx.array([long_prompt(16)]), cache=cache)
            logits[dtype] = out.astype(mx.float32)
            mx.eval(logits[dtype])
            engine._loaded.streamer.release_pins()
        finally:
            engine.close()
    assert not bool(mx.array_equal(logits["float32"], logits["bfloat16"]))


def test_fp32_expert_scales_are_held_as_bf16_beside_bf16_activations(tiny_model) -> None:  # type: ignore[no-untyped-def]
    """A model that stores fp32 scales, run in bf16: mlx-lm's ``set_dtype(bfloat16)`` turns every
    float parameter into bf16, the experts' scales and biases included, so the slots narrow them
    too (they were kept fp32: logprobs 0.3 apart after a 2,100-token prompt). Logits bit for bit."""
    from mlx_lm.utils import load_model

    path = tiny_model("qwen3_moe", 4)  # the demo builder's default: fp32 expert scales
    prompt = mx.array([long_prompt(24)])
    ref, _ = load_model(path)
    assert {v.dtype for k, v in tree_flatten(ref.parameters()) if "switch_mlp" in k and k.endswith("scales")} == {mx.float32}
    ref.set_dtype(mx.bfloat16)
    want = ref(prompt)
    mx.eval(want)
    engine = Engine.load(path, EngineOptions(cache_mb=0, device=DEVICE, activation_dtype="bfloat16"), measure_disk=False)
    try:
        slot_dtypes = {a.dtype for c in engine._loaded.streamer.caches for k, a in c.pool.arrays.items()
                       if k.endswith(("scales", "biases"))}  # fmt: skip
        got = engine.model(prompt, cache=engine.make_kv_cache())
        mx.eval(got)
        engine._loaded.streamer.release_pins()
    finally:
        engine.close()
    assert slot_dtypes == {mx.bfloat16}
    assert bool(mx.array_equal(got, want))
