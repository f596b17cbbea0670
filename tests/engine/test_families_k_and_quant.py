"""K overrides across the families' own field names, quantization modes (affine bit widths, mixed
per-module bits, mxfp4), named refusals, and the attributes a streamed bank keeps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from engine.engine import Engine
from engine.errors import UnsupportedModelError
from engine.types import EngineOptions, SamplingParams
from exactness import cache_mb

from test_families import LONG_CHUNK, LONG_PROMPT, N_TOKENS, SHORT_PROMPT

# The config change that sets K=3 in mlx-lm's model, written out by hand per family (each names
# K differently or keeps it nested): the reference for the engine's --experts-per-token 3.
K3_CONFIGS: dict[str, Any] = {
    "qwen3_moe": {"num_experts_per_tok": 3},
    "ernie4_5_moe": {"moe_k": 3},
    "hunyuan": {"moe_topk": 3},
    "step3p5": {"moe_top_k": 3},
    "kimi_linear": {"num_experts_per_token": 3},
    "qwen3_5_moe": {"text_config": {"num_experts_per_tok": 3}},
    "gemma4": {"text_config": {"top_k_experts": 3}},
}


def _reference(path: Path, tokenizer: Any, prompt: list[int], chunk: int, overrides: dict[str, Any] | None = None) -> list[int]:
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler
    from mlx_lm.utils import load_model

    config = json.loads((path / "config.json").read_text())
    merged = None
    if overrides:
        merged = {}
        for key, value in overrides.items():
            merged[key] = {**config[key], **value} if isinstance(value, dict) else value
    model, _ = load_model(path, model_config=merged)
    stream = stream_generate(model, tokenizer, prompt, max_tokens=N_TOKENS, sampler=make_sampler(0.0),
                             prefill_step_size=chunk)  # fmt: skip
    return [r.token for r in stream]


def _logits(path: Path, overrides: dict[str, Any] | None = None) -> np.ndarray:
    """mlx-lm's logits for the short prompt with the config changed by ``overrides``."""
    import mlx.core as mx
    from mlx_lm.utils import load_model

    config = json.loads((path / "config.json").read_text())
    merged = {k: ({**config[k], **v} if isinstance(v, dict) else v) for k, v in (overrides or {}).items()}
    model, _ = load_model(path, model_config=merged or None)
    return np.array(model(mx.array([SHORT_PROMPT])))


def _streamed(path: Path, prompt: list[int], chunk: int, **options: Any) -> tuple[list[int], Engine]:
    engine = Engine.load(path, EngineOptions(prefill_chunk=chunk, prefill_matmul="on", **options), measure_disk=False)
    try:
        return [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS))], engine
    finally:
        engine.close()


@pytest.mark.parametrize("family", sorted(K3_CONFIGS))
def test_k_override_reaches_the_family_field(family: str, family_model: Any, fast_tokenizer: Any) -> None:
    path = family_model(family)
    expected = _reference(path, fast_tokenizer, SHORT_PROMPT, 512, K3_CONFIGS[family])
    assert not np.allclose(_logits(path, K3_CONFIGS[family]), _logits(path)), "K=3 should change mlx-lm's logits"
    got, engine = _streamed(path, SHORT_PROMPT, 512, cache_mb=0.0, experts_per_token=3)
    assert engine.experts_per_token == 3
    assert got == expected


def test_k_override_warns_where_the_family_fixes_k(family_model: Any, fast_tokenizer: Any, capsys: Any) -> None:
    path = family_model("llama4")  # mlx-lm's llama4 supports one expert per token only
    expected = _reference(path, fast_tokenizer, SHORT_PROMPT, 512)
    got, engine = _streamed(path, SHORT_PROMPT, 512, cache_mb=0.0, experts_per_token=2)
    assert "--experts-per-token 2 ignored" in capsys.readouterr().err
    assert engine.experts_per_token == 1
    assert got == expected


def _check_exact(path: Path, tokenizer: Any) -> None:
    for prompt, chunk, cache in ((SHORT_PROMPT, 512, "zero"), (LONG_PROMPT, LONG_CHUNK, "partial")):
        got, _ = _streamed(path, prompt, chunk, cache_mb=cache_mb(path, cache))
        assert got == _reference(path, tokenizer, prompt, chunk), (prompt is LONG_PROMPT, cache)


QUICK_MODES = [{"bits": 3}, {"bits": 4, "mixed": True}, {"mode": "mxfp4"}]
SLOW_MODES = [{"bits": b} for b in (2, 5, 6, 8)] + [{"mode": "mxfp8"}, {"mode": "nvfp4"}]


@pytest.mark.parametrize("quant", QUICK_MODES, ids=lambda q: "-".join(f"{k}{v}" for k, v in q.items()))
def test_quantization_modes_stream_exactly(quant: dict[str, Any], family_model: Any, fast_tokenizer: Any) -> None:
    path = family_model("qwen3_moe", **quant)
    config = json.loads((path / "config.json").read_text())
    if quant.get("mixed"):
        per_module = {k: v for k, v in config["quantization"].items() if isinstance(v, dict)}
        assert {v["bits"] for k, v in per_module.items() if "switch_mlp" in k} == {4, 8}
        assert {v["bits"] for k, v in per_module.items() if "switch_mlp" not in k} == {6}
        one_bank = {per_module[f"model.layers.1.mlp.switch_mlp.{p}_proj"]["bits"] for p in ("gate", "up", "down")}
        assert one_bank == {4, 8}  # one bank holds projections of two widths
    _check_exact(path, fast_tokenizer)


@pytest.mark.slow
@pytest.mark.parametrize("quant", SLOW_MODES, ids=lambda q: "-".join(f"{k}{v}" for k, v in q.items()))
@pytest.mark.parametrize("family", ["qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_more_quantization_modes_stream_exactly(family: str, quant: dict[str, Any], family_model: Any, fast_tokenizer: Any) -> None:
    _check_exact(family_model(family, **quant), fast_tokenizer)


def test_global_scale_experts_are_refused_by_module(family_model: Any, fast_tokenizer: Any) -> None:
    path = family_model("qwen3_moe", mode="nvfp4", global_scale=True)
    with pytest.raises(UnsupportedModelError, match=r"model\.layers\.\d+\.mlp\.switch_mlp\.\w+_proj: experts with a global scale"):
        Engine.load(path, EngineOptions(cache_mb=0.0), measure_disk=False)


def test_streamed_bank_keeps_the_replaced_module_s_attributes(family_model: Any, fast_tokenizer: Any) -> None:
    engine = Engine.load(family_model("qwen3_moe"), EngineOptions(cache_mb=0.0), measure_disk=False)
    try:
        switch = engine._loaded.switches[0]
        inner = switch.inner_module
        assert switch.gate_proj is inner.gate_proj and switch.activation is inner.activation
        assert switch.down_proj.weight.shape[0] == engine._loaded.streamer.capacity(0)  # slots, not experts
        with pytest.raises(AttributeError):
            _ = switch.no_such_attribute
    finally:
        engine.close()
