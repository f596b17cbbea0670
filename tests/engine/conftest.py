"""Fixtures of the engine tests: tiny models of any mlx-lm MoE family built once per session, one
shared tokenizer for them, a packed tiny model per module."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest


@pytest.fixture(scope="session")
def shared_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One qwen3 tokenizer for every family model (they all carry the same files)."""
    from mlx_lm.utils import load_tokenizer

    from engine.demo.tokenizer_builder import install_tokenizer

    folder = tmp_path_factory.mktemp("family_tokenizer")
    install_tokenizer(folder, "qwen3")
    return load_tokenizer(folder)


@pytest.fixture(scope="session")
def family_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Factory: family_model(family, **build_kwargs) -> the tiny model's folder, built once."""
    from engine.demo.family_models import build_family_model

    root = tmp_path_factory.mktemp("family_models")
    built: dict[tuple[str, str], Path] = {}

    def make(family: str, **kwargs: Any) -> Path:
        key = (family, json.dumps(kwargs, sort_keys=True))
        if key not in built:
            built[key] = build_family_model(root / f"{family}-{len(built)}", family, **kwargs)
        return built[key]

    return make


@pytest.fixture
def fast_tokenizer(monkeypatch: pytest.MonkeyPatch, shared_tokenizer: Any) -> Any:
    """The loader gets the shared tokenizer (loading a 150k-token tokenizer costs seconds)."""
    import engine.model.loader as loader

    monkeypatch.setattr(loader, "_load_tokenizer", lambda model_dir, config: shared_tokenizer)
    return shared_tokenizer


@pytest.fixture(scope="module")
def packed_model(tiny_model: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A packed copy of the tiny model (copy it with its mtimes to edit it: the pack stays current)."""
    import shutil

    from engine.storage.pack import pack_model

    path = tmp_path_factory.mktemp("packed") / "model"
    shutil.copytree(tiny_model("qwen3_moe", 4), path)
    pack_model(path, io_threads=2)
    return path
