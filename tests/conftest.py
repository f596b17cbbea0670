"""Shared test fixtures: tiny random-weight MoE models built once per session."""

from __future__ import annotations

import os

# Qt aborts with neither DISPLAY nor QT_QPA_PLATFORM set; default to offscreen for the suite.
os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Builder arguments a test may pass to tiny_model besides model_type and bits;
# any other keyword becomes a config.json override (e.g. num_experts=32).
_BUILDER_KWARGS = ("preset", "num_layers", "tokenizer", "seed", "max_shard_bytes", "expert_scales_dtype")

TinyModelFactory = Callable[..., Path]


def _freeze(value: Any) -> Any:
    """A hashable form of an override value (lists and dicts become tuples)."""
    if isinstance(value, dict):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    return value


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> TinyModelFactory:
    """Factory: tiny_model(model_type="qwen3_moe", bits=4, **overrides) -> model dir (built once per args).

    model_type: qwen3_moe, qwen3_next or qwen3_5_moe; bits: 4 or 8. Keywords in
    ("preset", "num_layers", "tokenizer", "seed", "max_shard_bytes") go to the builder, the rest
    override config fields. Treat the returned directory as read-only: other tests share it.
    """
    from engine.demo.demo_model import build_random_moe_model

    built: dict[Any, Path] = {}
    root = tmp_path_factory.mktemp("tiny_models")

    def make(model_type: str = "qwen3_moe", bits: int = 4, **overrides: Any) -> Path:
        key = (model_type, bits, _freeze(overrides))
        if key not in built:
            builder = {k: overrides.pop(k) for k in _BUILDER_KWARGS if k in overrides}
            builder.setdefault("preset", "tiny")
            out = root / f"{model_type}-{bits}bit-{len(built)}"
            build_random_moe_model(
                out, model_type, bits, config_overrides=overrides or None, **builder
            )
            built[key] = out
        return built[key]

    return make
