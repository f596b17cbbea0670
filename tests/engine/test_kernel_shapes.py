"""mlx-lm's shapes where a row's result depends on its call (engine.model.kernel_shapes).

The CPU's kernels give a row the same result whatever else is in its call, so here a backend
whose kernels do not is emulated: MLX's quantized matmuls are wrapped so that a call in CUDA's
vector class (rows x index pairs < 8) comes out slightly different from the tiled class, as
the H100 showed (2e-7 apart there; far apart here, so that a wrong class changes tokens). mlx-lm and the
engine then see the same emulated backend: the engine's tokens equal mlx-lm's only if it calls
the kernels with mlx-lm's classes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.sample_utils import make_sampler
from mlx_lm.utils import load_model

from engine.engine import Engine
from engine.errors import RequestError
from engine.model.kernel_shapes import (CUDA_VECTOR_PAIRS, MLX_LM_PREFILL_STEP, aligned_pass_tokens, mirror_setting,
                                        pad_to, short_step_tail)
from engine.types import EngineOptions, SamplingParams

NEW = 6


def test_mlx_lm_shapes_are_on_where_rows_depend_on_their_call() -> None:
    assert not mirror_setting("auto", "cpu")
    assert mirror_setting("auto", "cuda") and mirror_setting("auto", "metal")
    assert mirror_setting("on", "cpu") and not mirror_setting("off", "cuda")
    with pytest.raises(RequestError, match="mlx_lm_shapes.*'sometimes'"):
        mirror_setting("sometimes", "cpu")


def test_passes_end_where_mlx_lm_steps_end() -> None:
    assert aligned_pass_tokens(100) == MLX_LM_PREFILL_STEP  # never less than one step
    assert aligned_pass_tokens(MLX_LM_PREFILL_STEP) == MLX_LM_PREFILL_STEP
    assert aligned_pass_tokens(5_000) == 2 * MLX_LM_PREFILL_STEP
    assert aligned_pass_tokens(104_857) % MLX_LM_PREFILL_STEP == 0


def test_a_short_last_step_gets_its_own_mlp_call() -> None:
    assert short_step_tail(2_048 + 3) == 3
    assert short_step_tail(4_096 + 7) == 7
    assert short_step_tail(2_048 + 8) == 0  # tiled like the pass
    assert short_step_tail(2_048) == 0
    assert short_step_tail(5) == 0  # the whole pass is that step: one call already


def test_split_expert_calls_are_padded_to_the_whole_calls_kernel() -> None:
    assert pad_to(3, 40, "cuda") == CUDA_VECTOR_PAIRS
    assert pad_to(3, 5, "cuda") == 3  # the whole call was in the vector class too
    assert pad_to(9, 40, "cuda") == 9
    assert pad_to(3, 40, "cpu") == 3 and pad_to(3, 40, "metal") == 3


def _vector_class(out: mx.array) -> bool:
    rows = out.shape[-2] if out.ndim > 1 else 1
    pairs = out.size // (rows * out.shape[-1])
    return rows * pairs < CUDA_VECTOR_PAIRS


@pytest.fixture
def row_dependent_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """MLX's quantized matmuls with CUDA's two kernel classes made visible (far apart)."""
    calls: list[str] = []
    qmm, gqmm = mx.quantized_matmul, mx.gather_qmm

    def wrap(fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> mx.array:
            out = fn(*args, **kwargs)
            vector = _vector_class(out)
            calls.append("vector" if vector else "tiled")
            return 3 * mx.roll(out, 1, axis=-1) if vector else out  # another result, row by row

        return call

    monkeypatch.setattr(mx, "quantized_matmul", wrap(qmm))
    monkeypatch.setattr(mx, "gather_qmm", wrap(gqmm))
    yield calls


def _mlx_lm(path: Path, prompt: list[int]) -> list[int]:
    model, _ = load_model(path)
    model.set_dtype(mx.float32)
    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=NEW, sampler=make_sampler(temp=0.0))]


def _engine(path: Path, prompt: list[int], shapes: str, kernel_backend: str | None = None) -> list[int]:
    engine = Engine.load(path, EngineOptions(cache_mb=0, mlx_lm_shapes=shapes, prefill_matmul="off"), measure_disk=False)
    try:
        if kernel_backend is not None:
            engine._loaded.streamer.kernel_backend = kernel_backend
        return [e.token for e in engine.generate(prompt, SamplingParams(max_tokens=NEW))]
    finally:
        engine.close()


def _prompt(n: int, seed: int = 0) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(100, 50_000, size=n)]


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next"])
def test_mlx_lm_shapes_give_mlx_lm_tokens_where_rows_depend_on_their_call(tiny_model, row_dependent_backend, model_type: str) -> None:
    """A prompt past mlx-lm's step, a short last step, cache 0 (expert calls in groups)."""
    path = tiny_model(model_type, 4)
    prompt = _prompt(MLX_LM_PREFILL_STEP + 4)  # mlx-lm: 2,048, then 3 (vector class), then the last
    want = _mlx_lm(path, prompt)
    assert "vector" in row_dependent_backend and "tiled" in row_dependent_backend  # both classes ran
    engine = Engine.load(path, EngineOptions(cache_mb=0, mlx_lm_shapes="on", prefill_matmul="off"), measure_disk=False)
    try:
        engine._loaded.streamer.kernel_backend = "cuda"
        assert engine.mlx_lm_shapes and engine.prefill_pass_tokens % MLX_LM_PREFILL_STEP == 0
        got = [e.token for e in engine.generate(prompt, SamplingParams(max_tokens=NEW))]
    finally:
        engine.close()
    assert got == want


def test_without_mlx_lm_shapes_the_emulated_backend_changes_tokens(tiny_model, row_dependent_backend) -> None:
    """The control: the last token inside the pass runs tiled where mlx-lm ran it alone."""
    path = tiny_model("qwen3_moe", 4)
    prompt = _prompt(40)
    assert _engine(path, prompt, "off") != _mlx_lm(path, prompt)
    assert _engine(path, prompt, "on", "cuda") == _mlx_lm(path, prompt)


def test_small_expert_groups_are_padded_to_the_calls_kernel(tiny_model, row_dependent_backend) -> None:
    """A short prompt whose experts outnumber the slots: groups of a few pairs each."""
    path = tiny_model("qwen3_moe", 4)
    prompt = _prompt(6, seed=3)
    want = _mlx_lm(path, prompt)
    assert _engine(path, prompt, "on", "cuda") == want
    assert _engine(path, prompt, "on", "cpu") != want  # unpadded groups take the vector kernel


def _attention_calls(monkeypatch: pytest.MonkeyPatch, model: Any, run: Any) -> Counter[tuple[str, int]]:
    """(module, rows) of every quantized matmul an attention module of ``model`` makes while ``run()`` runs."""
    names = {id(m["weight"]): name for name, m in model.named_modules() if "attn" in name and isinstance(m, nn.QuantizedLinear)}
    seen: Counter[tuple[str, int]] = Counter()
    qmm = mx.quantized_matmul

    def call(x: mx.array, w: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if id(w) in names:
            seen[(names[id(w)], x.size // x.shape[-1])] += 1
        return qmm(x, w, *args, **kwargs)

    monkeypatch.setattr(mx, "quantized_matmul", call)
    try:
        run()
    finally:
        monkeypatch.setattr(mx, "quantized_matmul", qmm)
    return seen


@pytest.mark.parametrize("step", [MLX_LM_PREFILL_STEP, 512])
def test_attention_calls_are_cut_where_mlx_lms_steps_are(tiny_model, monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Every attention projection (full and linear) runs on mlx-lm's row counts; cut at 512 they do not."""
    import engine.model.generate as generate_module

    path = tiny_model("qwen3_next", 4)
    prompt = _prompt(MLX_LM_PREFILL_STEP + 5)
    model, _ = load_model(path)
    model.set_dtype(mx.float32)
    sampler = make_sampler(temp=0.0)
    want = _attention_calls(monkeypatch, model, lambda: list(generate_step(mx.array(prompt), model, max_tokens=2, sampler=sampler)))
    assert want and {rows for _, rows in want} == {MLX_LM_PREFILL_STEP, 4, 1}
    monkeypatch.setattr(generate_module, "MLX_LM_PREFILL_STEP", step)  # the control: other cuts
    engine = Engine.load(path, EngineOptions(cache_mb=0, mlx_lm_shapes="on", prefill_matmul="off"), measure_disk=False)
    try:
        got = _attention_calls(monkeypatch, engine.model, lambda: list(engine.generate(prompt, SamplingParams(max_tokens=2))))
    finally:
        engine.close()
    # (one-row calls: the last token and decode, which mlx-lm runs one step ahead; tested above)
    prefill_got, prefill_want = (Counter({c: n for c, n in calls.items() if c[1] > 1}) for calls in (got, want))
    assert (prefill_got == prefill_want) == (step == MLX_LM_PREFILL_STEP)


def test_without_the_short_steps_own_call_the_emulated_backend_changes_tokens(tiny_model, row_dependent_backend,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The control of the tail split: mlx-lm's last 3-token step ran its shared expert in the vector class."""
    import engine.model.generate as generate_module

    path = tiny_model("qwen3_next", 4)
    prompt = _prompt(MLX_LM_PREFILL_STEP + 4)
    want = _mlx_lm(path, prompt)
    assert _engine(path, prompt, "on", "cuda") == want
    monkeypatch.setattr(generate_module, "short_step_tail", lambda n: 0)
    assert _engine(path, prompt, "on", "cuda") != want
