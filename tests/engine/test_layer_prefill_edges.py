"""Edges of the one-pass prefill and its neighbours: a model whose output head is the tied
embedding gets mlx-lm's tokens from a layer-major pass (engine/model/layer_prefill.logits_of), a
prefill memory set by the user is taken as given, the output projection is split only where
there is something to split, and MLX's freed buffers are returned on request."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
import pytest

from engine.engine import Engine
from engine.model import cpu_parallel
from engine.model.layer_prefill import DEFAULT_PREFILL_MEMORY, prefill_memory_bytes
from engine.model.mlx_memory import clear_mlx_cache
from engine.types import EngineOptions, SamplingParams
from exactness import assert_not_degenerate, cache_mb, long_prompt, mlx_lm_reference, share_tokenizers


@pytest.fixture(autouse=True)
def _shared_tokenizers(monkeypatch: pytest.MonkeyPatch) -> None:
    share_tokenizers(monkeypatch)


def test_tied_output_head_in_a_layer_major_pass_equals_mlx_lm(tiny_model) -> None:
    path = tiny_model("qwen3_next", 4, tie_word_embeddings=True, seed=1)  # (qwen3_moe tied: a 1-token loop)
    prompt = long_prompt(200)
    expected = mlx_lm_reference(path, prompt, 32)
    assert_not_degenerate(expected, minimum=12)
    engine = Engine.load(path, EngineOptions(cache_mb=cache_mb(path, "partial"), prefill_pass_tokens=64), measure_disk=False)
    try:
        assert engine.layer_major_prefill and engine.prefill_pass_tokens == 64  # four passes
        assert not hasattr(engine.model, "lm_head") or engine.model.args.tie_word_embeddings
        got = [ev.token for ev in engine.generate(prompt, SamplingParams(max_tokens=32))]
    finally:
        engine.close()
    assert got == expected


def test_prefill_memory_set_by_the_user_is_taken_as_given() -> None:
    assert prefill_memory_bytes(64, ram_total=1 << 40) == 64 << 20
    assert prefill_memory_bytes(0.5, ram_total=1 << 40) == 1 << 19
    assert prefill_memory_bytes(None, ram_total=8 << 30) == 1 << 30  # RAM / 8
    assert prefill_memory_bytes(None, ram_total=0) == DEFAULT_PREFILL_MEMORY  # RAM unknown


def test_output_projection_split_only_where_there_is_one(monkeypatch: pytest.MonkeyPatch) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)

    model = nn.Module()
    model.lm_head = nn.Linear(4, 10)
    assert cpu_parallel.split_output_projection(model, 1) is False  # one stream: nothing to gain
    assert isinstance(model.lm_head, nn.Linear)
    assert cpu_parallel.split_output_projection(Tied(), 4) is False  # no lm_head of its own


def test_cpu_streams_without_affinity_use_the_core_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # (macOS has none)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert cpu_parallel.cpu_streams() == 4
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert cpu_parallel.cpu_streams() == 1


def test_clear_mlx_cache_returns_freed_buffers() -> None:
    a = mx.ones((1 << 20,))
    mx.eval(a)
    del a
    clear_mlx_cache()
    assert mx.get_cache_memory() == 0
