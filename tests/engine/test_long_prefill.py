"""Long prompts: one pass over the experts, exact against mlx-lm, progress, Stop, context refusal.

The prompts here are longer than mlx-lm's own prefill step (2,048 tokens), so mlx-lm prefills in
two chunks while the engine makes one layer-major pass (engine.model.layer_prefill).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.sample_utils import make_sampler

from engine.engine import Engine
from engine.errors import RequestError
from engine.model.array_limits import (GPU_SAFE_ARRAY_BYTES, MAX_ELEMENTS, max_array_bytes, max_quantized_elements,
                                      max_slots_per_array)
from engine.model.layer_prefill import PassShape, pass_tokens
from engine.model.loader import inspect_experts, use_prefill_matmul
from engine.model.prefill_progress import CacheCheckpoint, PrefillProgress
from engine.model.prompt_cache import cache_length
from engine.types import EngineOptions, SamplingParams

FAMILIES = ("qwen3_moe", "qwen3_next", "qwen3_5_moe")
LONG = 2_100  # more than mlx-lm's 2,048-token prefill step
NEW = 10  # tokens generated after a long prompt
_references: dict[tuple[Path, tuple[int, ...], int], list[int]] = {}


def _prompt(n: int, seed: int = 0) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(100, 50_000, size=n)]


def _reference(path: Path, prompt: list[int], n: int) -> list[int]:
    """mlx-lm's greedy tokens on the fully loaded model (fp32 activations, as the engine on the CPU)."""
    key = (path, tuple(prompt), n)
    if key not in _references:
        model, tok = mlx_load(str(path))[:2]
        model.set_dtype(mx.float32)
        _references[key] = [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, sampler=make_sampler(0.0))]
    return _references[key]


def _all_expert_bytes(path: Path) -> int:
    return sum(l.expert_bytes * l.num_experts for l in inspect_experts(path).layers)


@pytest.mark.parametrize(
    "model_type", [pytest.param("qwen3_moe", marks=pytest.mark.slow), "qwen3_next", pytest.param("qwen3_5_moe", marks=pytest.mark.slow)]
)
def test_long_prompt_in_one_pass_equals_mlx_lm(tiny_model, model_type: str) -> None:
    """Cache 0: every layer's experts go through the pool in groups; the prompt is read once."""
    path = tiny_model(model_type, 4)
    prompt = _prompt(LONG)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        assert engine.layer_major_prefill and engine.prefill_pass_tokens >= LONG
        events = list(engine.generate(prompt, SamplingParams(max_tokens=NEW)))
    finally:
        engine.close()
    assert [e.token for e in events] == _reference(path, prompt, NEW)
    # Each layer's experts once (a 2,100-token prompt touches all 16 of every layer), and the
    # last layer only for the last token: at most the model's expert bytes, at least all but a layer.
    layers = inspect_experts(path).layers
    read = events[-1].stats.prefill.bytes_read
    total = _all_expert_bytes(path)
    assert total * (len(layers) - 1) / len(layers) <= read <= total


@pytest.mark.slow
def test_passes_of_512_read_the_experts_once_per_pass(tiny_model) -> None:
    """The old fixed chunk, for comparison: each pass reads every expert of every layer again."""
    path = tiny_model("qwen3_moe", 4)
    prompt = _prompt(LONG)
    engine = Engine.load(path, EngineOptions(cache_mb=0, prefill_pass_tokens=512), measure_disk=False)
    try:
        events = list(engine.generate(prompt, SamplingParams(max_tokens=NEW)))
    finally:
        engine.close()
    assert [e.token for e in events] == _reference(path, prompt, NEW)
    layers = len(inspect_experts(path).layers)
    passes = -(-LONG // 512)
    assert events[-1].stats.prefill.bytes_read >= (passes - 1) * _all_expert_bytes(path) * (layers - 1) / layers


@pytest.mark.parametrize(
    ("model_type", "lengths"),
    [
        ("qwen3_next", (300, 200)),
        pytest.param("qwen3_next", (1_200, 1_000), marks=pytest.mark.slow),
        pytest.param("qwen3_5_moe", (1_200, 1_000), marks=pytest.mark.slow),
    ],
)
def test_second_turn_on_the_kept_cache_equals_mlx_lm(tiny_model, model_type: str, lengths: tuple[int, int]) -> None:
    """Linear-attention state and KV cache carried across two turns, with a partial cache."""
    path = tiny_model(model_type, 4)
    first, second = _prompt(lengths[0], seed=1), _prompt(lengths[1], seed=2)
    slots = 24 * inspect_experts(path).layers[0].expert_bytes / 2**20
    engine = Engine.load(path, EngineOptions(cache_mb=slots), measure_disk=False)
    try:
        kv = engine.make_kv_cache()
        answer = [e.token for e in engine.generate(first, SamplingParams(max_tokens=3), kv_cache=kv)]
        assert cache_length(kv) in (None, len(first) + 2)  # the last answer token is not fed yet
        turn = [answer[-1], *second]
        got = [e.token for e in engine.generate(turn, SamplingParams(max_tokens=NEW), kv_cache=kv, reused_tokens=len(first) + 2)]
    finally:
        engine.close()
    assert answer == _reference(path, first, 3)
    assert got == _reference(path, first + answer + second, NEW)


def _stop_after(calls: int) -> Any:
    seen = [0]

    def stop() -> bool:
        seen[0] += 1
        return seen[0] > calls

    return stop


@pytest.mark.parametrize("calls", [pytest.param(0, marks=pytest.mark.slow), 3, 8, pytest.param(30, marks=pytest.mark.slow)])
def test_stop_mid_prefill_rolls_the_cache_back_and_the_next_turn_is_exact(tiny_model, calls: int) -> None:
    """Stopped at a pass start, between layers or between expert groups: nothing half-written stays."""
    path = tiny_model("qwen3_5_moe", 4)
    prompt = _prompt(400, seed=3)
    engine = Engine.load(path, EngineOptions(cache_mb=0, prefill_pass_tokens=128), measure_disk=False)
    try:
        kv = engine.make_kv_cache()
        progress: list[PrefillProgress] = []
        events = list(engine.generate(prompt, SamplingParams(max_tokens=4), stop=_stop_after(calls), kv_cache=kv, on_prefill=progress.append))
        assert events[-1].finish_reason == "cancelled" and len(events) == 1
        done = progress[-1].tokens_done if progress else 0  # stopped before the first report
        assert done % 128 == 0 and cache_length(kv) == done  # whole passes only
        # the same cache finishes the prompt exactly
        rest = [e.token for e in engine.generate(prompt[done:], SamplingParams(max_tokens=4), kv_cache=kv, reused_tokens=done)]
    finally:
        engine.close()
    assert rest == _reference(path, prompt, 4)


def test_progress_reports_every_layer_of_every_pass(tiny_model) -> None:
    path = tiny_model("qwen3_next", 4)
    prompt = _prompt(300)
    engine = Engine.load(path, EngineOptions(cache_mb=0, prefill_pass_tokens=128), measure_disk=False)
    try:
        seen: list[PrefillProgress] = []
        list(engine.generate(prompt, SamplingParams(max_tokens=1), on_prefill=seen.append))
    finally:
        engine.close()
    layers = seen[0].layers_total
    assert [(p.pass_index, p.layers_done) for p in seen] == [(i, d) for i in range(3) for d in range(layers + 1)]
    assert seen[-1].fraction == 1.0 and seen[0].fraction == 0.0 and seen[0].seconds_left is None
    assert [p.bytes_read for p in seen] == sorted(p.bytes_read for p in seen) and seen[-1].bytes_read > 0
    assert seen[-1].to_dict()["tokens_total"] == 300


def test_prompt_over_the_context_is_refused_before_any_read(tiny_model) -> None:
    path = tiny_model("qwen3_moe", 4, max_position_embeddings=256)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        with pytest.raises(RequestError, match="context is 256 tokens"):
            engine.generate(_prompt(256), SamplingParams(max_tokens=4))
        with pytest.raises(RequestError, match="200 reused"):
            list(engine.generate(_prompt(56), SamplingParams(max_tokens=4), reused_tokens=200))
        assert engine.expert_counters()["bytes_read"] == 0
        assert len(list(engine.generate(_prompt(255), SamplingParams(max_tokens=1)))) == 1
    finally:
        engine.close()


def test_checkpoint_restores_offsets_and_linear_states(tiny_model) -> None:
    path = tiny_model("qwen3_next", 4)
    engine = Engine.load(path, EngineOptions(cache_mb=0), measure_disk=False)
    try:
        kv = engine.make_kv_cache()
        list(engine.generate(_prompt(40), SamplingParams(max_tokens=1), kv_cache=kv))
        before = [(getattr(c, "offset", None), [id(a) for a in getattr(c, "cache", [])]) for c in kv]
        mark = CacheCheckpoint(kv)
        list(engine.generate(_prompt(30, seed=5), SamplingParams(max_tokens=1), kv_cache=kv, reused_tokens=40))
        assert cache_length(kv) == 70
        mark.restore()
        assert [(getattr(c, "offset", None), [id(a) for a in getattr(c, "cache", [])]) for c in kv] == before
    finally:
        engine.close()


def test_pass_size_comes_from_the_memory_budget() -> None:
    # Qwen3.5-397B's shape in bf16 (GPU): 3*10*(4096+1024)+6*4096 elements a token
    shape = PassShape(hidden=4096, experts_per_token=10, moe_intermediate=1024, heads=32, act_bytes=2)
    assert shape.bytes_per_token() == 2 * (3 * 10 * 5120 + 6 * 4096)
    assert pass_tokens(shape, 2 << 30, 262_144, materialised_attention=False) == (2 << 30) // shape.bytes_per_token()
    assert pass_tokens(shape, 1 << 40, 4096, materialised_attention=False) == 4096  # never past the context
    cpu = PassShape(4096, 10, 1024, 32, 4)
    with_scores = pass_tokens(cpu, 2 << 30, 8192, materialised_attention=True)
    assert with_scores == ((2 << 30) - 4 * 32 * 512 * 8192) // cpu.bytes_per_token()
    assert pass_tokens(cpu, 1, 8192, materialised_attention=True) == 16  # a floor, not zero


def test_a_pass_keeps_its_gathered_rows_under_2_to_the_32_elements() -> None:
    from engine.model.layer_prefill import max_gather_tokens

    shape = PassShape(hidden=4096, experts_per_token=10, moe_intermediate=1024, heads=32, act_bytes=2)
    cap = max_gather_tokens(shape)
    assert cap * 10 * 4096 < 2**32 <= (cap + 1) * 10 * 4096  # 104,857 tokens at Qwen3.5-397B's shape
    assert pass_tokens(shape, 1 << 40, 262_144, materialised_attention=False) == cap  # a 1 TiB budget is capped
    assert pass_tokens(shape, 2 << 30, 262_144, materialised_attention=False) < cap  # the default budget is below it


def test_slot_arrays_are_bounded_in_bytes_per_backend() -> None:
    assert max_array_bytes("cuda", {}) == GPU_SAFE_ARRAY_BYTES == 2 << 30
    assert max_array_bytes("metal", {"max_buffer_length": 1 << 30}) == 1 << 30
    assert max_array_bytes("metal", {"max_buffer_length": 32 << 30}) == 2 << 30
    assert max_array_bytes("cpu", {}) > 1 << 40  # the element count bounds it there
    # Qwen3.5-397B's gate_proj weight: 1024 x 512 uint32 = 2 MiB a slot -> 1,024 slots in 2 GiB
    assert max_slots_per_array(2 << 20, 1024 * 512, 2 << 30) == 1024
    assert max_slots_per_array(4, 1, 1 << 62) == MAX_ELEMENTS


def test_on_cuda_packed_weights_stay_under_2_to_the_32_quantized_elements() -> None:
    # CUDA's tiled gather kernel offsets a slot in 32 bits counted in quantized elements
    assert max_quantized_elements("cuda") == 2**32 and max_quantized_elements("metal") is None
    assert max_quantized_elements("cpu") is None
    rows_x_cols = 1024 * 4096  # one Qwen3.5-397B expert projection
    for bits, slots in ((4, 1024), (8, 512), (2, 1024), (3, 1024)):
        words = rows_x_cols * bits // 32
        # 4-bit: 2 GiB either way; 8-bit: the byte limit binds; 2- and 3-bit: the element count does
        assert max_slots_per_array(words * 4, words, 2 << 30, rows_x_cols, 2**32) == slots, bits
    assert max_slots_per_array(rows_x_cols // 4, rows_x_cols // 16, 2 << 30, rows_x_cols, None) == 2048


def test_the_loader_knows_each_packed_weights_quantized_elements(tiny_model) -> None:
    experts = inspect_experts(tiny_model("qwen3_moe", 4))
    layer = experts.layers[0]
    config = experts.config
    hidden, inter = config["hidden_size"], config["moe_intermediate_size"]
    assert layer.quantized_elements == {  # rows x input columns of each projection, from the model's config
        "gate_proj.weight": inter * hidden, "up_proj.weight": inter * hidden, "down_proj.weight": hidden * inter,
    }  # fmt: skip

    class Unmarked:  # a module whose projections carry no ``bits``: the words are counted at 2 bits
        gate_proj = object()

    from engine.model.loader import quantized_elements

    weight = next(p for p in layer.params if p.key == "gate_proj.weight")
    assert quantized_elements(Unmarked(), [weight]) == {"gate_proj.weight": weight.shape[0] * weight.shape[1] * 16}


def test_pools_split_under_the_quantized_element_limit_stay_exact(tiny_model, monkeypatch) -> None:
    import engine.model.streamed_moe as streamed_moe

    path = tiny_model("qwen3_moe", 4)
    layer = inspect_experts(path).layers[0]
    limit = 10 * max(layer.quantized_elements.values())  # ten slots a packed weight, as on CUDA at scale
    monkeypatch.setattr(streamed_moe, "max_quantized_elements", lambda: limit)
    prompt = _prompt(300)
    engine = Engine.load(path, EngineOptions(cache_mb=_all_expert_bytes(path) / 2**20), measure_disk=False)
    try:
        caches = engine._loaded.streamer.caches
        assert len(caches) > 1 and all(c.pool.n_slots <= 10 for c in caches)
        got = [e.token for e in engine.generate(prompt, SamplingParams(max_tokens=NEW))]
    finally:
        engine.close()
    assert got == _reference(path, prompt, NEW)


def test_pools_split_under_the_byte_limit_stay_exact(tiny_model, monkeypatch) -> None:
    import engine.model.streamed_moe as streamed_moe

    path = tiny_model("qwen3_moe", 4)
    limit = 10 * max(p.nbytes for p in inspect_experts(path).layers[0].params)
    monkeypatch.setattr(streamed_moe, "max_array_bytes", lambda: limit)
    prompt = _prompt(300)
    engine = Engine.load(path, EngineOptions(cache_mb=_all_expert_bytes(path) / 2**20), measure_disk=False)
    try:
        caches = engine._loaded.streamer.caches
        assert len(caches) > 1 and all(a.nbytes <= limit for c in caches for a in c.pool.arrays.values())
        got = [e.token for e in engine.generate(prompt, SamplingParams(max_tokens=NEW))]
    finally:
        engine.close()
    assert got == _reference(path, prompt, NEW)


def test_dense_gemm_prefill_only_where_the_model_runs_on_the_cpu() -> None:
    assert use_prefill_matmul("on", "cpu")
    assert not use_prefill_matmul("on", "gpu") and not use_prefill_matmul("auto", "gpu")


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen3_5_moe"])
def test_expert_runs_prefill_reads_each_expert_once_per_run_and_stays_exact(tiny_model, monkeypatch, family: str) -> None:
    """The GPU's per-expert prefill path (one quantized matmul per expert run), run here on the CPU."""
    import engine.model.loader as loader

    import engine.model.prefill_matmul as prefill_matmul

    monkeypatch.setattr(loader, "expert_runs_prefill", lambda setting, device: True)
    path = tiny_model(family, 4)
    runs: list[tuple[int, int, int]] = []  # (module, slot, rows) of each expert-run matmul
    real = prefill_matmul.quantized_run

    def recording(rows, module, slot):
        runs.append((id(module), slot, int(rows.shape[0])))
        return real(rows, module, slot)

    monkeypatch.setattr(prefill_matmul, "quantized_run", recording)
    prompt = _prompt(300)
    engine = Engine.load(path, EngineOptions(cache_mb=0, prefill_matmul="off"), measure_disk=False)
    try:
        mode = engine._loaded.streamer.prefill_matmul
        assert mode.enabled and mode.kind == "quantized"
        got = [e.token for e in engine.generate(prompt, SamplingParams(max_tokens=NEW))]
    finally:
        engine.close()
    assert runs and len(runs) == mode.dense_gemms  # every expert run of the prefill went this way
    assert all(rows >= mode.min_expert_rows for _, _, rows in runs)
    assert sum(rows for _, _, rows in runs) >= 4 * len(runs)  # an expert's weights read once for its rows
    assert got == _reference(path, prompt, NEW)


def test_expert_runs_prefill_is_for_gpus_and_only_when_asked() -> None:
    from engine.model.loader import expert_runs_prefill

    assert expert_runs_prefill("on", "gpu")
    assert not expert_runs_prefill("auto", "gpu") and not expert_runs_prefill("off", "gpu")
    assert not expert_runs_prefill("on", "cpu")
    with pytest.raises(RequestError, match="prefill_matmul"):
        expert_runs_prefill("fast", "gpu")
