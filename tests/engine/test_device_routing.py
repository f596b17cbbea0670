"""Device routing: a layer whose every expert stays resident skips the host sync, and stays exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from engine.engine import Engine
from engine.model.expert_cache import ExpertCache, SlotPool
from engine.storage.expert_layout import ExpertParam
from engine.model.loader import inspect_experts
from engine.types import EngineOptions, SamplingParams

PROMPT = "Experts that never leave the cache need no round trip to the host"
N_TOKENS = 24


def _cache(n_slots: int, layer_experts: dict[int, int]) -> ExpertCache:
    pool = SlotPool([ExpertParam("w", "U8", (8,), 8)], n_slots)
    return ExpertCache(pool, layer_experts=layer_experts)


def test_layer_slots_only_when_every_expert_is_resident() -> None:
    cache = _cache(6, {0: 3, 1: 3})
    assert cache.holds_all
    assert cache.layer_slots(0) is None
    slots = {e: cache.assign((0, e), set()) for e in (2, 0, 1)}
    cache.assign((1, 0), set())
    got = cache.layer_slots(0)
    assert got is not None and got.tolist() == [slots[0], slots[1], slots[2]]
    assert cache.layer_slots(1) is None
    version = cache.version
    cache.forget((0, 1))  # a failed read frees the slot: the layer is no longer complete
    assert cache.layer_slots(0) is None and cache.version != version


def test_eviction_breaks_completeness_and_small_pools_never_hold_all() -> None:
    cache = _cache(3, {0: 2, 1: 2})
    assert not cache.holds_all
    cache.assign((0, 0), set())
    cache.assign((0, 1), set())
    assert cache.layer_slots(0) is not None
    cache.assign((1, 0), set())
    cache.assign((1, 1), {(0, 1), (1, 0)})  # evicts (0, 0), the least recently used
    assert cache.layer_slots(0) is None
    assert cache.layer_slots(1) is not None
    assert not _cache(8, {}).holds_all  # a cache that does not know its layers never claims it


def _reference(path: Path) -> tuple[list[int], list[int]]:
    model, tok = mlx_load(str(path))[:2]
    prompt = tok.encode(PROMPT, add_special_tokens=False)
    out = [r.token for r in stream_generate(model, tok, prompt, max_tokens=N_TOKENS, sampler=make_sampler(0.0))]
    return prompt, out


def test_the_every_expert_cache_size_holds_every_expert_where_slots_widen_scales(tiny_model) -> None:
    """bf16 scales beside fp32 activations take twice their bytes in the slots: a cache sized at
    the stored bytes held 925 of 1,024 experts per pool on the H100's 397B-shape bench (no device
    routing); ``every_expert_cache_mb`` holds them all."""
    from engine.model.memory_budget import every_expert_cache_mb

    path = tiny_model("qwen3_moe", 4, expert_scales_dtype="bfloat16")
    total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)
    holds = {}
    # (without its 64 MiB margin, which alone holds a tiny model's experts)
    for name, mb in (("stored bytes", total / 2**20), ("every expert", every_expert_cache_mb(total) - 64)):
        engine = Engine.load(path, EngineOptions(cache_mb=mb, activation_dtype="float32"), measure_disk=False)
        try:
            holds[name] = all(c.holds_all for c in engine._loaded.streamer.caches)
            if name == "every expert":
                assert engine.preload_experts() == total
                assert engine._loaded.streamer.resident_bytes >= total
        finally:
            engine.close()
    assert holds == {"stored bytes": False, "every expert": True}


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_5_moe"])
def test_preloaded_model_routes_on_device_and_equals_mlx_lm(tiny_model, model_type: str) -> None:
    path = tiny_model(model_type, 4)
    prompt, expected = _reference(path)
    layers = inspect_experts(path).layers
    total = sum(l.expert_bytes * l.num_experts for l in layers)
    engine = Engine.load(path, EngineOptions(cache_mb=total / 2**20 + 1), measure_disk=False)
    try:
        assert engine.preload_experts() == total
        before = engine.expert_counters()
        routed = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
        after = engine.expert_counters()
        engine.set_device_routing(False)
        synced = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))]
        last = engine.expert_counters()
    finally:
        engine.close()
    assert routed == expected and synced == expected
    assert after["bytes_read"] == before["bytes_read"]  # nothing read: all was preloaded
    # prefill (a chunk and the last token) and every decode step went through every layer
    assert after["device_routed_calls"] - before["device_routed_calls"] >= len(layers) * N_TOKENS
    assert last["device_routed_calls"] == after["device_routed_calls"]  # forced host path
    assert last["cache_hits"] > after["cache_hits"] and last["cache_misses"] == after["cache_misses"]


def test_partial_cache_keeps_the_host_sync_path(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    one_layer = inspect_experts(path).layers[0]
    engine = Engine.load(path, EngineOptions(cache_mb=one_layer.expert_bytes * 3 / 2**20), measure_disk=False)
    try:
        assert engine.preload_experts() == 0  # no pool can hold all of its layers
        list(engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=4)))
        counters = engine.expert_counters()
    finally:
        engine.close()
    assert counters["device_routed_calls"] == 0 and counters["cache_misses"] > 0


def test_device_table_is_rebuilt_after_the_layer_changes(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4)
    layers = inspect_experts(path).layers
    total = sum(l.expert_bytes * l.num_experts for l in layers)
    engine = Engine.load(path, EngineOptions(cache_mb=total / 2**20 + 1), measure_disk=False)
    try:
        engine.preload_experts()
        streamer = engine._loaded.streamer
        first = streamer.device_table(0)
        assert first is not None and streamer.device_table(0) is first  # reused while unchanged
        cache = streamer.cache_of_layer[0]
        cache.forget((0, 0))
        assert streamer.device_table(0) is None
        slot = cache.assign((0, 0), set())
        engine._loaded.store.read_into(0, 0, cache.pool.dests(slot))
        table = streamer.device_table(0)
        assert table is not None and table is not first
        assert np.array(table).tolist() == cache.layer_slots(0).tolist()
    finally:
        engine.close()


def _preloaded(tiny_model) -> tuple[Engine, list[int]]:
    path = tiny_model("qwen3_moe", 4)
    total = sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)
    engine = Engine.load(path, EngineOptions(cache_mb=total / 2**20 + 1), measure_disk=False)
    engine.preload_experts()
    return engine, engine.tokenizer.encode(PROMPT, add_special_tokens=False)


def _run(engine: Engine, prompt: list[int], eos: set[int], max_tokens: int, take: int | None = None):
    """Generate (closing the generator after ``take`` events if given); return (tokens, reason, cache length)."""
    from engine.model.generate import generate_tokens
    from engine.model.prompt_cache import cache_length

    kv = engine.make_kv_cache()
    gen = generate_tokens(
        engine.model, engine._loaded.streamer, kv, prompt, SamplingParams(max_tokens=max_tokens), eos_token_ids=eos
    )
    events = []
    for ev in gen:
        events.append(ev)
        if take is not None and len(events) == take:
            gen.close()
            break
    return [e.token for e in events], events[-1].finish_reason, cache_length(kv)


def test_slot_ids_reach_the_expert_kernels_as_uint32_like_the_routers_own(tiny_model, monkeypatch) -> None:
    """argpartition gives mlx-lm's switch uint32 ids; ids of another dtype cost a cast per
    projection and layer on the device (three kernels more per MoE layer on CUDA)."""
    import mlx.core as mx

    from engine.model.streamed_moe import StreamedSwitch

    engine, prompt = _preloaded(tiny_model)
    try:
        table = engine._loaded.streamer.device_table(0)
        assert table is not None and table.dtype == mx.uint32
    finally:
        engine.close()
    seen: list[mx.Dtype] = []
    real = StreamedSwitch._call_inner

    def spy(self: StreamedSwitch, x: mx.array, host_slots: np.ndarray, slot_idx: mx.array) -> mx.array:
        seen.append(slot_idx.dtype)
        return real(self, x, host_slots, slot_idx)

    monkeypatch.setattr(StreamedSwitch, "_call_inner", spy)
    path = tiny_model("qwen3_moe", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)  # host-synced routing, slots reused
    try:
        list(engine.generate(prompt, SamplingParams(max_tokens=3)))
    finally:
        engine.close()
    assert seen and set(seen) == {mx.uint32}


def test_steps_queued_ahead_are_taken_back_out_of_the_cache(tiny_model, monkeypatch) -> None:
    import engine.model.generate as generate_module

    trims: list[int] = []
    real_trim = generate_module.trim_prompt_cache
    monkeypatch.setattr(generate_module, "trim_prompt_cache", lambda c, n: trims.append(n) or real_trim(c, n))
    engine, prompt = _preloaded(tiny_model)
    try:
        free, _, _ = _run(engine, prompt, set(), 12)
        # an end-of-sequence token in the middle: the step queued after it must not stay in the cache
        stop_at = next(i for i, t in enumerate(free) if i >= 3 and t not in free[:i])
        results = {}
        for routing in (True, False):
            engine.set_device_routing(routing)
            trims.clear()
            stopped = _run(engine, prompt, {free[stop_at]}, 12)
            closed = _run(engine, prompt, set(), 12, take=3)
            full = _run(engine, prompt, set(), 12)
            results[routing] = (stopped, closed, full, len(trims))
    finally:
        engine.close()
    for routing, (stopped, closed, full, n_trims) in results.items():
        assert stopped == (free[: stop_at + 1], "stop", len(prompt) + stop_at)
        assert closed[0] == free[:3] and closed[2] == len(prompt) + 2
        assert full == (free, "length", len(prompt) + 11)
        # queued steps only where every layer routes on the device; none after the last token
        assert n_trims == (2 if routing else 0)


def test_pool_placement_does_nothing_off_cuda() -> None:
    from engine.model import cuda_memory

    pool = SlotPool([ExpertParam("w", "U8", (8,), 8)], 4)
    pool.dests(2)[0][:] = 7
    assert not cuda_memory.active()
    assert pool.prefer_host() is False and pool.slots_to_device([2], wait=True) is False
    assert np.array(pool.arrays["w"][2]).tolist() == [7] * 8  # the zero-copy CPU path is untouched


@pytest.mark.parametrize(("device", "norm_dtype", "widen"), [
    ("cpu", "bfloat16", True),  # the CPU always runs fp32 activations
    ("gpu", "float32", True),  # fp32 activations on a GPU: bf16 slot scales would be promoted per call
    ("gpu", "bfloat16", False),  # bf16 activations: slots keep the stored dtype, as mlx-lm does
])  # fmt: skip
def test_slot_scales_are_widened_wherever_activations_are_fp32(tiny_model, device: str, norm_dtype: str, widen: bool) -> None:
    import mlx.core as mx

    from engine.model.loader import dense_dtype, slots_widen_half_floats

    model = inspect_experts(tiny_model("qwen3_moe", 4)).model
    assert dense_dtype(model) == mx.float32  # the demo builder writes fp32 dense weights
    model.set_dtype(getattr(mx, norm_dtype))
    assert dense_dtype(model) == getattr(mx, norm_dtype)
    assert slots_widen_half_floats(device, model) is widen


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_half_float_parameters_are_widened_exactly(dtype: str) -> None:
    import mlx.core as mx

    from engine.model.expert_cache import ConvertBuffer

    half = {"BF16": mx.bfloat16, "F16": mx.float16}[dtype]
    values = (mx.random.normal((4096,)) * 1e3).astype(half)
    raw = np.array(mx.view(values, mx.uint8))
    target = np.zeros(4096 * 4, dtype=np.uint8)
    ConvertBuffer(raw, target, dtype).finish()
    assert np.array_equal(target.view(np.float32), np.array(values.astype(mx.float32)))


@pytest.mark.parametrize("dtype", ["F32", "F16"])
def test_float_parameters_are_narrowed_to_bf16_as_mlx_casts_them(dtype: str) -> None:
    import mlx.core as mx

    from engine.model.expert_cache import ConvertBuffer

    stored = {"F32": mx.float32, "F16": mx.float16}[dtype]
    values = mx.random.normal((8192,)) * 1e2
    # values halfway between two bf16 numbers (ties round to even), the extremes, zeros and inf
    # and NaNs whose payload would round to inf or wrap to -0 without the NaN rule
    halfway = mx.array(np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x7F7FFFFF, 0x00008000, 0x80000000, 0x7F800000,
                                 0x7F800001, 0x7FFFFFFF, 0xFFC00001],
                                dtype=np.uint32).view(np.float32))
    values = mx.concatenate([values, halfway]).astype(stored)
    raw = np.array(mx.view(values, mx.uint8))
    target = np.zeros(values.size * 2, dtype=np.uint8)
    ConvertBuffer(raw, target, dtype, "BF16").finish()
    want = np.array(mx.view(values.astype(mx.bfloat16), mx.uint16))
    assert np.array_equal(target.view(np.uint16), want)
