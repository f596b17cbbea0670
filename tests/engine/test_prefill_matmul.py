"""Dense-GEMM prefill on the CPU (engine.model.prefill_matmul): the same results as MLX's quantized kernels."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load as mlx_load
from mlx_lm import stream_generate
from mlx_lm.models.switch_layers import QuantizedSwitchLinear, SwitchGLU
from mlx_lm.sample_utils import make_sampler

from engine.model.prefill_matmul import (
    PrefillMatmul,
    PrefillQuantizedLinear,
    PrefillSwitchLinear,
    dequant_matmul,
    install_prefill_matmul,
)
from engine.engine import Engine
from engine.errors import RequestError
from engine.model.loader import use_prefill_matmul
from engine.types import EngineOptions, SamplingParams

# fp32 throughout; the dense path sums in another order than MLX's quantized kernel.
RTOL = 2e-5


def _close(a: mx.array, b: mx.array) -> None:
    a_np, b_np = np.array(a), np.array(b)
    np.testing.assert_allclose(a_np, b_np, rtol=RTOL, atol=RTOL * float(np.abs(b_np).max()))


def _quantized_linear(in_dims: int, out_dims: int, bits: int, bias: bool) -> nn.QuantizedLinear:
    mx.random.seed(3)
    linear = nn.Linear(in_dims, out_dims, bias=bias)
    if bias:
        linear.bias = mx.random.normal((out_dims,))
    return nn.QuantizedLinear.from_linear(linear, group_size=64, bits=bits)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("streams", [1, 2, 3])
def test_dequant_matmul_matches_quantized_matmul(bits: int, streams: int) -> None:
    q = _quantized_linear(256, 384, bits, bias=False)
    x = mx.random.normal((48, 256))
    ref = mx.quantized_matmul(x, q.weight, q.scales, q.biases, transpose=True, group_size=64, bits=bits)
    _close(dequant_matmul(x, q.weight, q.scales, q.biases, q, streams), ref)


def test_quantized_linear_uses_the_dense_path_only_for_long_inputs() -> None:
    q = _quantized_linear(128, 192, 4, bias=True)
    short, long = mx.random.normal((1, 8, 128)), mx.random.normal((2, 40, 128))
    ref_short, ref_long = q(short), q(long)
    mode = PrefillMatmul(enabled=True, streams=2, min_rows=32)
    assert install_prefill_matmul([q], mode) == 1 and type(q) is PrefillQuantizedLinear
    assert np.array_equal(np.array(q(short)), np.array(ref_short)) and mode.dense_gemms == 0
    out = q(long)
    assert out.shape == ref_long.shape and mode.dense_gemms == 1
    _close(out, ref_long)
    mode.enabled = False
    assert np.array_equal(np.array(q(long)), np.array(ref_long)) and mode.dense_gemms == 1


def _switch_glu(bias: bool = False) -> SwitchGLU:
    mx.random.seed(5)
    glu = SwitchGLU(128, 64, 8, bias=bias)
    if bias:
        for proj in (glu.gate_proj, glu.up_proj, glu.down_proj):
            proj.bias = mx.random.normal(proj.bias.shape)
    nn.quantize(glu, group_size=64, bits=4)
    assert isinstance(glu.gate_proj, QuantizedSwitchLinear)
    return glu


def _routing(tokens: int, k: int, experts: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # uneven load: some experts get many rows, some one or two
    p = rng.dirichlet(np.full(experts, 0.3))
    return np.stack([rng.choice(experts, size=k, replace=False, p=p) for _ in range(tokens)])[None]


@pytest.mark.parametrize("bias", [False, True])
def test_switch_projections_run_long_expert_runs_densely(bias: bool) -> None:
    glu = _switch_glu(bias)
    x = mx.random.normal((1, 40, 128))
    host_idx = _routing(40, 2, 8)  # 80 routed rows: mlx-lm sorts them by expert
    idx = mx.array(host_idx.astype(np.uint32))
    ref = glu(x, idx)
    mode = PrefillMatmul(enabled=True, streams=2, min_expert_rows=6)
    assert install_prefill_matmul([glu], mode) == 3
    assert all(type(p) is PrefillSwitchLinear for p in (glu.gate_proj, glu.up_proj, glu.down_proj))
    counts = np.unique(host_idx, return_counts=True)[1]
    assert counts.min() < 6 <= counts.max()  # both kinds of run are exercised
    mode.plan = np.unique(host_idx, return_counts=True)
    out = glu(x, idx)
    assert mode.dense_gemms == 3 * int((counts >= 6).sum())
    _close(out, ref)
    # only short runs: mlx-lm's own kernel on slices of the call, bit for bit
    mode.min_expert_rows = 10**6
    assert np.array_equal(np.array(glu(x, idx)), np.array(ref))
    # no plan, or one that does not describe the call: mlx-lm's call unchanged
    mode.plan = None
    assert np.array_equal(np.array(glu(x, idx)), np.array(ref))
    mode.plan, mode.min_expert_rows = (np.array([0]), np.array([3])), 1
    assert np.array_equal(np.array(glu(x, idx)), np.array(ref))


def test_install_keeps_the_parameter_tree() -> None:
    glu = _switch_glu()
    before = {k: v.shape for k, v in tree_flatten(glu.parameters())}
    install_prefill_matmul([glu], PrefillMatmul())
    assert {k: v.shape for k, v in tree_flatten(glu.parameters())} == before
    # subclasses are left alone: their call may differ
    class Custom(nn.QuantizedLinear):
        pass

    custom = Custom(64, 64)
    assert install_prefill_matmul([custom], PrefillMatmul()) == 0 and type(custom) is Custom


def test_setting_is_checked() -> None:
    assert use_prefill_matmul("on") and not use_prefill_matmul("off")
    with pytest.raises(RequestError, match="'maybe'"):
        use_prefill_matmul("maybe")


@pytest.mark.parametrize("model_type", ["qwen3_moe", "qwen3_next", "qwen3_5_moe"])
def test_dense_prefill_gives_mlx_lm_tokens(tiny_model, model_type: str) -> None:
    path = tiny_model(model_type, 4)
    rng = np.random.default_rng(1)
    prompt = [int(t) for t in rng.integers(100, 50_000, size=200)]
    model, tok = mlx_load(str(path))
    expected = [r.token for r in stream_generate(model, tok, prompt, max_tokens=8, sampler=make_sampler(0.0))]
    for setting, cache_mb in (("on", 0.0), ("on", 1000.0), ("off", 0.0)):
        engine = Engine.load(path, EngineOptions(cache_mb=cache_mb, prefill_chunk=128, prefill_matmul=setting),
                             measure_disk=False)  # fmt: skip
        try:
            got = [e.token for e in engine.generate(prompt, SamplingParams(max_tokens=8))]
            gemms = engine._loaded.streamer.prefill_matmul.dense_gemms
        finally:
            engine.close()
        assert got == expected, (setting, cache_mb)
        assert (gemms > 0) == (setting == "on"), (setting, gemms)


@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_dequantize_affine_equals_mlx_dequantize(bits: int, group_size: int) -> None:
    from engine.model.prefill_matmul import dequantize_affine

    w = mx.random.normal((96, 256))
    q, s, b = mx.quantize(w, group_size, bits)
    ref = mx.dequantize(q, s, b, group_size=group_size, bits=bits)
    assert np.array_equal(np.array(dequantize_affine(q, s, b, group_size, bits)), np.array(ref))
    # row blocks of a slot (what the split over CPU streams takes)
    assert np.array_equal(np.array(dequantize_affine(q[40:96], s[40:96], b[40:96], group_size, bits)), np.array(ref[40:96]))
