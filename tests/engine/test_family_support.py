"""What the app tells a person about a model folder before loading it (engine/model/family_support.py):
families that stream, that are untested or refused, and folders it cannot read, each named."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.model import family_support as fs
from engine.model.family_support import FamilySupport, folder_support


def _folder(tmp_path: Path, config: object | None) -> Path:
    if config is not None:
        (tmp_path / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return tmp_path


def test_each_status_is_described_with_its_reason() -> None:
    assert FamilySupport("qwen3_moe", "streams", "").describe().startswith("qwen3_moe: its MoE models stream")
    refused = FamilySupport("oddmoe", "refused", "its experts are not stacked").describe()
    assert refused == "oddmoe: cannot stream (its experts are not stacked)"
    untested = FamilySupport("muse_spark", "untested", "needs Metal").describe()
    assert untested == "muse_spark: MoE family not tested by MoeBar (needs Metal); it may load"


def test_an_untested_family_of_the_table_says_so(tmp_path: Path) -> None:
    line = folder_support(_folder(tmp_path, {"model_type": "muse_spark"}))
    assert line.startswith("muse_spark: MoE family not tested by MoeBar (") and line.endswith("; it may load")


@pytest.mark.parametrize("config", [None, "{not json", {"hidden_size": 8}, ["model_type"]], ids=["absent", "not-json", "no-model-type", "not-an-object"])
def test_a_folder_without_a_readable_model_type_is_named(tmp_path: Path, config: object | None) -> None:
    assert folder_support(_folder(tmp_path, config)) == f"{tmp_path}: no readable config.json with a model_type"


def test_a_dense_family_has_nothing_to_stream(tmp_path: Path) -> None:
    line = folder_support(_folder(tmp_path, {"model_type": "llama"}))
    assert line == "llama: not an MoE family of the installed mlx-lm (nothing to stream)"


def test_a_refused_family_row_reaches_the_folder_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    table = {"aliases": {"odd": "oddmoe"}, "families": {"oddmoe": {"status": "refused", "detail": "experts per row"}}}
    monkeypatch.setattr(fs, "_table", lambda: table)
    assert folder_support(_folder(tmp_path, {"model_type": "odd"})) == "oddmoe: cannot stream (experts per row)"
